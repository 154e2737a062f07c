"""The onnx target: onnxruntime-genai's model builder and native loop, compared with PyTorch.

Pure tests (check, plan) run anywhere; the rest export small artifacts and need the onnx extra.
tiny_llama's greedy output only repeats the prompt's last token, so token-for-token parity is
also checked on ``untied_llama``, whose greedy text depends on the whole context.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmopt import api, artifact, generation
from llmopt.errors import ArtifactError, MissingDependencyError, PromptTooLongError, RecipeError, UsageError
from llmopt.recipe import resolve
from llmopt.runners.base import SamplingConfig
from tests.conftest import PROMPTS, pytorch_results  # noqa: F401

pytestmark = pytest.mark.onnx

INSTALL_HINT = "the onnx extra is not installed: pip install 'llmopt[onnx]'"
def needs_onnxruntime_genai():
    pytest.importorskip("onnxruntime_genai", reason=INSTALL_HINT)
    pytest.importorskip("onnx", reason=INSTALL_HINT)


def onnx_recipe(model: Path | str, batch_size: int = 1, sequence_length: int = 64, **overrides):
    return resolve(None, {"model": str(model), "target": "onnx", "shapes.batch_size": batch_size,
                          "shapes.sequence_length": sequence_length, **overrides})


def export(tmp_path_factory, model: Path, batch_size: int, sequence_length: int) -> Path:
    needs_onnxruntime_genai()
    output = tmp_path_factory.mktemp("onnx") / f"b{batch_size}-s{sequence_length}"
    api.export(onnx_recipe(model, batch_size, sequence_length), output)
    return output


@pytest.fixture(scope="module")
def tiny_b1(tiny_llama, tmp_path_factory) -> Path:
    return export(tmp_path_factory, tiny_llama, batch_size=1, sequence_length=64)


@pytest.fixture(scope="module")
def untied_b1(untied_llama, tmp_path_factory) -> Path:
    return export(tmp_path_factory, untied_llama, batch_size=1, sequence_length=96)


@pytest.fixture(scope="module")
def untied_b4(untied_llama, tmp_path_factory) -> Path:
    return export(tmp_path_factory, untied_llama, batch_size=4, sequence_length=96)


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


# -- generation: token for token with PyTorch ----------------------------------------------------


@pytest.mark.parametrize("artifact_name", ["tiny_b1", "untied_b1", "untied_b4"])
def test_greedy_run_matches_pytorch(artifact_name, request, tiny_llama, untied_llama):
    path = request.getfixturevalue(artifact_name)
    checkpoint = tiny_llama if artifact_name.startswith("tiny") else untied_llama
    manifest = artifact.read_manifest(path)
    results = api.run(path, PROMPTS, temperature=0.0, max_new_tokens=24)
    expected = pytorch_results(checkpoint, manifest, PROMPTS, SamplingConfig(max_new_tokens=24))
    assert len({r.prompt_tokens for r in results}) == len(PROMPTS)
    for got, want in zip(results, expected):
        assert got.token_ids == want.token_ids, got.prompt
        assert got.finish_reason == want.finish_reason
        assert got.ttft_ms > 0


def test_repetition_penalty_matches_pytorch(untied_b4, untied_llama):
    sampling = SamplingConfig(max_new_tokens=24, repetition_penalty=1.3)
    runner = api.open_runner(untied_b4)
    try:
        results = generation.generate(runner, PROMPTS, sampling, chat=False)
    finally:
        runner.close()
    expected = pytorch_results(untied_llama, runner.manifest, PROMPTS, sampling, chat=False)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]


def test_rows_stop_at_their_own_end_of_sequence(untied_b4, untied_llama):
    from llmopt.runners.pytorch import PyTorchRunner

    runner = api.open_runner(untied_b4)
    reference = PyTorchRunner.from_checkpoint(untied_llama, batch_size=4, threads=1)
    batch = [generation.encode_prompt(runner.tokenizer, prompt, chat=False) for prompt in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=16)
    free = runner.generate(batch, sampling).sequences
    row_one = free[1].token_ids
    stop_at = next(i for i in range(2, len(row_one)) if row_one[i] not in row_one[:i])
    stop_token = row_one[stop_at]  # row 1 stops there; the other rows wherever they meet it
    runner.eos_token_ids = reference.eos_token_ids = {stop_token}
    streamed: dict[int, list[int]] = {}
    got = runner.generate(batch, sampling, on_token=lambda row, token: streamed.setdefault(row, []).append(token))
    want = reference.generate(batch, sampling)
    runner.close()
    assert got.sequences[1].token_ids == row_one[: stop_at + 1] and got.sequences[1].finish_reason == "stop"
    for row in range(4):
        assert got.sequences[row].token_ids == want.sequences[row].token_ids
        assert got.sequences[row].finish_reason == want.sequences[row].finish_reason
        assert streamed[row] == got.sequences[row].token_ids


def test_rows_without_an_end_token_run_to_the_limit(untied_b4):
    runner = api.open_runner(untied_b4)
    runner.eos_token_ids = set()  # what a fixed-length benchmark does
    try:
        batch = [generation.encode_prompt(runner.tokenizer, prompt, chat=False) for prompt in PROMPTS]
        output = runner.generate(batch, SamplingConfig(max_new_tokens=40))
    finally:
        runner.close()
    for sequence in output.sequences:
        assert len(sequence.token_ids) == 40 and min(sequence.token_ids) >= 0 and sequence.finish_reason == "length"


def test_generation_reaching_sequence_length_stops_with_length(tiny_b1):
    result = api.run(tiny_b1, ["hello"], temperature=0.0, max_new_tokens=1000)[0]
    assert result.finish_reason == "length"
    assert result.prompt_tokens + len(result.token_ids) == 64


def test_prompt_longer_than_the_artifact_is_refused(tiny_b1):
    with pytest.raises(PromptTooLongError, match="at most 63"):
        api.run(tiny_b1, ["fox " * 100], max_new_tokens=4)
    runner = api.open_runner(tiny_b1)
    try:
        with pytest.raises(PromptTooLongError):
            runner.generate([[5] * 64], SamplingConfig(max_new_tokens=1))
        with pytest.raises(UsageError, match="exactly 1 rows"):
            runner.generate([[5], [6]], SamplingConfig(max_new_tokens=1))
    finally:
        runner.close()


def test_teacher_forced_logits_match_pytorch_with_a_pinned_batch(untied_b4, untied_llama):
    from llmopt.runners.pytorch import PyTorchRunner

    token_ids = list(range(3, 99))  # the whole sequence_length
    runner = api.open_runner(untied_b4)
    try:
        logits = runner.logits(token_ids)
    finally:
        runner.close()
    expected = PyTorchRunner.from_checkpoint(untied_llama, threads=1).logits(token_ids)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)


def test_sampling_is_seeded(untied_b1):
    runs = [api.run(untied_b1, ["Hi"], temperature=1.0, top_k=0, seed=seed, max_new_tokens=16)[0].token_ids
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and len(runs[0]) > 0


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


# -- the real model ------------------------------------------------------------------------------

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about compilers.", "List three colors.",
                "Explain recursion in one sentence."]


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_smollm2_greedy_matches_pytorch(smollm2, tmp_path_factory, batch_size):
    path = export(tmp_path_factory, smollm2, batch_size=batch_size, sequence_length=256)
    manifest = artifact.read_manifest(path)
    assert manifest.validation["passed"] and manifest.validation["top1_agreement"] >= 0.99
    prompts = CHAT_PROMPTS[:batch_size] if batch_size > 1 else CHAT_PROMPTS[:1]
    sampling = SamplingConfig(max_new_tokens=32)
    results = api.run(path, prompts, temperature=0.0, max_new_tokens=32)
    expected = pytorch_results(smollm2, manifest, prompts, sampling)
    for got, want in zip(results, expected):
        assert got.token_ids == want.token_ids, got.prompt
        assert got.text == want.text
    if batch_size == 1:
        og = pytest.importorskip("onnxruntime_genai")
        from transformers import AutoTokenizer

        text = "Héllo wörld,\n  naïve café"
        tokenizer = og.Tokenizer(og.Model(str(path)))
        ids = tokenizer.encode(text).tolist()
        assert ids == AutoTokenizer.from_pretrained(smollm2).encode(text)
        assert min(ids) >= 0 and tokenizer.decode(np.array(ids, dtype=np.int32)) == text
