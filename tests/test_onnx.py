"""The onnx target: onnxruntime-genai's model builder and native loop, compared with PyTorch.

Pure tests (check, plan) run anywhere; the rest export small artifacts and need the onnx extra.
What every target must do (parity with PyTorch, pinned batches, limits, verify) is in
tests/test_contract.py; this file holds what is particular to this target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmopt import api, artifact
from llmopt.errors import MissingDependencyError, RecipeError
from llmopt.recipe import resolve
from llmopt.runners.base import SamplingConfig

pytestmark = pytest.mark.onnx

INSTALL_HINT = "the onnx extra is not installed: pip install 'llmopt[onnx]'"
def needs_onnxruntime_genai():
    pytest.importorskip("onnxruntime_genai", reason=INSTALL_HINT)
    pytest.importorskip("onnx", reason=INSTALL_HINT)


def onnx_recipe(model: Path | str, batch_size: int = 1, sequence_length: int = 64, **overrides):
    return resolve(None, {"model": str(model), "target": "onnx", "shapes.batch_size": batch_size,
                          "shapes.sequence_length": sequence_length, **overrides})


def export(build_artifact, model: Path, batch_size: int, sequence_length: int) -> Path:
    """The same artifacts the contract test builds (one build per session)."""
    needs_onnxruntime_genai()
    return build_artifact(model, **{"target": "onnx", "shapes.batch_size": batch_size,
                                    "shapes.sequence_length": sequence_length})


@pytest.fixture(scope="module")
def tiny_b1(tiny_llama, build_artifact) -> Path:
    return export(build_artifact, tiny_llama, batch_size=1, sequence_length=64)


@pytest.fixture(scope="module")
def untied_b1(untied_llama, build_artifact) -> Path:
    return export(build_artifact, untied_llama, batch_size=1, sequence_length=96)


@pytest.fixture(scope="module")
def untied_b4(untied_llama, build_artifact) -> Path:
    return export(build_artifact, untied_llama, batch_size=4, sequence_length=96)


# -- check and plan: pure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"precision.dtype": "bf16"}, "precision.dtype"),
        ({"precision.dtype": "fp16"}, "precision.dtype"),
        ({"quantization.weight_format": "fp8"}, "quantization.weight_format"),
        ({"onnx.provider": "tensorrt"}, "onnx.provider"),
        ({"onnx.opset": 17}, "onnx.opset"),
    ],
)
def test_check_refuses_what_the_builder_cannot_honour(overrides, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")) as error:
        api.plan(onnx_recipe("some/model", **overrides))
    assert "accepted" in str(error.value) or error.value.hint


def test_half_precision_is_accepted_on_cuda():
    for dtype in ("fp16", "bf16"):
        plan = api.plan(onnx_recipe("some/model", **{"precision.dtype": dtype, "onnx.provider": "cuda"}))["plan"]
        assert plan["builder"]["precision"] == dtype and plan["builder"]["execution_provider"] == "cuda"


def test_plan_names_the_builder_call_and_the_pinned_shapes():
    plan = api.plan(onnx_recipe("some/model", batch_size=4, sequence_length=256))["plan"]
    builder = plan["builder"]
    assert builder["call"] == "onnxruntime_genai.models.builder.create_model"
    assert (builder["precision"], builder["execution_provider"]) == ("fp32", "cpu")
    assert builder["extra_options"] == {"hf_token": "false", "hf_remote": False}
    assert plan["post_process"]["genai_config.json"]["search.max_length"] == 256
    assert "4" in plan["post_process"]["model.onnx"]["inputs and outputs"]
    assert plan["runtime"] == {"loader": "onnxruntime-genai", "provider": "cpu", "config": "genai_config.json",
                               "model": "model.onnx"}
    assert json.loads(json.dumps(plan)) == plan


def test_static_shapes_take_the_static_path():
    plan = api.plan(onnx_recipe("some/model", **{"shapes.static": True}))["plan"]
    assert plan["static"] is True and "builder" not in plan


def test_gpu_provider_without_a_gpu_fails_preflight():
    onnxruntime = pytest.importorskip("onnxruntime", reason=INSTALL_HINT)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA execution provider")
    from llmopt.exporters.onnx import OnnxExporter

    with pytest.raises(MissingDependencyError, match=r"llmopt\[gpu\]"):
        OnnxExporter().preflight(onnx_recipe("some/model", **{"onnx.provider": "cuda"}))


# -- export --------------------------------------------------------------------------------------


def test_export_writes_a_complete_manifest(tiny_b1):
    manifest = artifact.load(tiny_b1)  # re-hashes every file
    assert manifest.target == "onnx" and manifest.shapes == {"batch_size": 1, "sequence_length": 64, "static": False}
    assert manifest.backend_versions["onnxruntime-genai"] and manifest.backend_versions["onnx"]
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(manifest.files)
    assert manifest.runtime["loader"] == "onnxruntime-genai" and manifest.runtime["provider"] == "cpu"
    assert manifest.io["inputs"]["input_ids"] == [1, "sequence_length"]
    assert manifest.io["outputs"]["logits"][0] == 1
    assert manifest.validation["passed"] and manifest.validation["top1_agreement"] >= 0.99
    assert not list(tiny_b1.parent.glob("*.partial-*"))


def test_graph_batch_dimension_is_pinned(untied_b4):
    import onnx

    graph = onnx.load(str(untied_b4 / "model.onnx"), load_external_data=False).graph
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_value == 4, value.name


def test_genai_config_holds_sequence_length(untied_b4):
    config = json.loads((untied_b4 / "genai_config.json").read_text())
    assert config["search"]["max_length"] == 96
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["context_length"] >= 96


def test_artifact_loads_in_plain_onnxruntime_genai(untied_b1, untied_llama):
    prompt_ids = [1, 17, 42, 99, 7, 300, 12]
    script = (
        "import json, sys, numpy as np, onnxruntime_genai as og\n"
        "model = og.Model(sys.argv[1])\n"
        "params = og.GeneratorParams(model)\n"
        "params.set_search_options(do_sample=False, max_length=len(json.loads(sys.argv[2])) + 12)\n"
        "generator = og.Generator(model, params)\n"
        "generator.append_tokens(np.array([json.loads(sys.argv[2])], dtype=np.int32))\n"
        "tokens = []\n"
        "while not generator.is_done():\n"
        "    generator.generate_next_token()\n"
        "    tokens.append(int(generator.get_next_tokens()[0]))\n"
        "assert not any(name.startswith('llmopt') for name in sys.modules)\n"
        "print(json.dumps(tokens))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script, str(untied_b1), json.dumps(prompt_ids)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    tokens = json.loads(completed.stdout.strip().splitlines()[-1])

    from llmopt.runners.pytorch import PyTorchRunner

    reference = PyTorchRunner.from_checkpoint(untied_llama, threads=1)
    reference.eos_token_ids = set()  # plain og was not told about eos beyond genai_config; compare raw greedy
    expected = reference.generate([prompt_ids], SamplingConfig(max_new_tokens=len(tokens))).sequences[0].token_ids
    eos = json.loads((untied_b1 / "genai_config.json").read_text())["model"]["eos_token_id"]
    cut = next((i + 1 for i, token in enumerate(expected) if token == eos), len(expected))
    assert tokens[:cut] == expected[:cut]


def test_prefill_projects_only_each_rows_last_token(untied_b4, untied_llama):
    """The lm_head runs on each right-padded row's last prompt token: those logits are PyTorch's, and the
    logits output repeats them over the positions (one projection per row, not one per position)."""
    from llmopt.runners.onnx import OnnxRunner
    from llmopt.runners.pytorch import PyTorchRunner

    runner = OnnxRunner.load(untied_b4)
    assert runner.manifest.runtime["logits"] == "last token"
    rows = [[1, 17, 42, 99, 7, 300, 12], [5, 6], [1, 2, 3, 4, 5], [250]]
    generator = runner._generator()
    generator.append_tokens(runner._input_ids(rows))
    raw = np.asarray(generator.get_output("logits"))  # [4, 7, vocab]
    last = np.asarray(generator.get_logits())[:, -1]
    reference = PyTorchRunner.from_checkpoint(untied_llama, threads=1)
    for row, ids in enumerate(rows):
        expected = reference.logits(ids)[-1]
        np.testing.assert_allclose(last[row, : expected.shape[0]], expected, atol=1e-3)
        np.testing.assert_array_equal(raw[row], np.broadcast_to(raw[row, len(ids) - 1], raw[row].shape),
                                      err_msg=f"row {row}: positions other than its last token were projected")


def test_reused_greedy_generator_starts_each_call_afresh(untied_b4):
    """The greedy generator is rewound, not rebuilt, between calls: no state leaks from the call before."""
    from llmopt.runners.onnx import OnnxRunner

    rows = [[1, 17, 42, 99, 7, 300, 12], [5, 6], [1, 2, 3, 4, 5], [250]]
    greedy = SamplingConfig(max_new_tokens=12)
    runner = OnnxRunner.load(untied_b4)
    runner.generate([[9, 8, 7, 6, 5, 4, 3, 2, 1]] * 4, SamplingConfig(max_new_tokens=40))
    reused = runner.generate(rows, greedy)
    assert runner._idle_generator is not None
    fresh = OnnxRunner.load(untied_b4).generate(rows, greedy)
    assert [s.token_ids for s in reused.sequences] == [s.token_ids for s in fresh.sequences]
    sampled = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    assert [s.token_ids for s in runner.generate(rows, sampled).sequences] == \
        [s.token_ids for s in runner.generate(rows, sampled).sequences]


def test_sequence_length_beyond_the_model_context_is_refused(tiny_llama, tmp_path):
    needs_onnxruntime_genai()
    output = tmp_path / "too-long"
    with pytest.raises(RecipeError, match="context length 512"):
        api.export(onnx_recipe(tiny_llama, sequence_length=1024), output)
    assert not output.exists() and not list(tmp_path.iterdir())


def test_export_keeps_stdout_for_results(untied_llama, tmp_path, capfd):
    needs_onnxruntime_genai()
    api.export(onnx_recipe(untied_llama, sequence_length=32), tmp_path / "quiet", validate=False)
    assert capfd.readouterr().out == ""


def test_gpu_artifact_never_falls_back_to_the_cpu(tiny_b1, monkeypatch):
    """A cuda artifact refuses a machine without a GPU, and a build without CUDA, instead of running on the CPU."""
    og = pytest.importorskip("onnxruntime_genai")
    from llmopt.hardware import GIB, DetectedGpu
    from llmopt.runners.onnx import OnnxRunner

    manifest = artifact.read_manifest(tiny_b1)
    manifest.runtime = {**manifest.runtime, "provider": "cuda"}
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [])
    with pytest.raises(MissingDependencyError, match="provider cuda and needs an NVIDIA GPU; this machine has none"):
        OnnxRunner(tiny_b1, manifest.batch_size, manifest.sequence_length, manifest=manifest)
    if og.is_cuda_available():
        return
    # A GPU is there, this onnxruntime-genai has no CUDA: refused by name, never opened on the CPU.
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [DetectedGpu("NVIDIA H100 80GB HBM3", 90, 80 * GIB)])
    with pytest.raises(MissingDependencyError, match="this onnxruntime-genai build has no CUDA"):
        OnnxRunner(tiny_b1, manifest.batch_size, manifest.sequence_length, manifest=manifest)


# -- the real model (greedy parity with PyTorch for every target: tests/test_contract.py) ---------


@pytest.mark.slow
def test_smollm2_tokenizer_travels_with_the_artifact(smollm2, build_artifact):
    """onnxruntime-genai's own tokenizer, from the artifact, encodes as the checkpoint's does (parity: test_contract)."""
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    path = build_artifact(smollm2, **{"target": "onnx", "shapes.batch_size": 1, "shapes.sequence_length": 256})
    text = "Héllo wörld,\n  naïve café"
    tokenizer = og.Tokenizer(og.Model(str(path)))
    ids = tokenizer.encode(text).tolist()
    assert ids == AutoTokenizer.from_pretrained(smollm2).encode(text)
    assert min(ids) >= 0 and tokenizer.decode(np.array(ids, dtype=np.int32)) == text
