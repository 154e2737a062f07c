"""The openvino target: optimum-intel's stateful IR run by openvino-genai, compared with PyTorch.

Pure tests (check, plan) run anywhere; the rest export small artifacts and need the openvino
extra. What every target must do (parity with PyTorch, pinned batches, limits, verify) is in
tests/test_contract.py; this file holds what is particular to this target. torch runs on one
thread beside OpenVINO, whose threads it would otherwise fight.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmopt import api, artifact, generation
from llmopt.errors import RecipeError
from llmopt.recipe import resolve
from llmopt.runners.base import SamplingConfig

pytestmark = pytest.mark.openvino

INSTALL_HINT = "the openvino extra is not installed: pip install 'llmopt[openvino]'"


def needs_openvino_genai():
    pytest.importorskip("openvino_genai", reason=INSTALL_HINT)
    pytest.importorskip("optimum.intel", reason=INSTALL_HINT)


@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    try:
        import torch
    except ImportError:  # the pure tests still run
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def openvino_recipe(model: Path | str, batch_size: int = 1, sequence_length: int = 64, **overrides):
    return resolve(None, {"model": str(model), "target": "openvino", "shapes.batch_size": batch_size,
                          "shapes.sequence_length": sequence_length, **overrides})


def export(build_artifact, model: Path, batch_size: int, sequence_length: int, **overrides) -> Path:
    """The same artifacts the contract test builds (one build per session)."""
    needs_openvino_genai()
    return build_artifact(model, **{"target": "openvino", "shapes.batch_size": batch_size,
                                    "shapes.sequence_length": sequence_length, **overrides})


@pytest.fixture(scope="module")
def tiny_b1(tiny_llama, build_artifact) -> Path:
    return export(build_artifact, tiny_llama, batch_size=1, sequence_length=64)


@pytest.fixture(scope="module")
def untied_b4(untied_llama, build_artifact) -> Path:
    return export(build_artifact, untied_llama, batch_size=4, sequence_length=96)


# -- check and plan: pure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"openvino.device": "TPU"}, "openvino.device"),
        ({"openvino.ov_config": {"ATTENTION_BACKEND": "SDPA"}, "shapes.batch_size": 4}, "openvino.ov_config"),
    ],
)
def test_check_refuses_what_the_target_cannot_honour(overrides, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")) as error:
        api.plan(openvino_recipe("some/model", **overrides))
    assert "accepted" in str(error.value)


def test_plan_names_the_export_call_the_pinned_batch_and_the_runtime():
    plan = api.plan(openvino_recipe("some/model", batch_size=4, sequence_length=256))["plan"]
    export_call = plan["export"]
    assert export_call["call"] == "optimum.exporters.openvino.main_export"
    assert (export_call["task"], export_call["stateful"]) == ("text-generation-with-past", True)
    assert export_call["ov_config"] == {"dtype": "fp32", "quantization_config": None}
    assert plan["reshape"] == {"input_ids": [4, -1], "attention_mask": [4, -1], "position_ids": [4, -1], "beam_idx": [4]}
    assert plan["pin"]["weights"].startswith("openvino_model.bin as optimum-intel saved it")
    assert plan["tokenizer"]["with_detokenizer"] is True
    runtime = plan["runtime"]
    assert runtime["loader"] == "openvino-genai" and runtime["device"] == "CPU"
    assert runtime["ov_config"] == {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    assert runtime["scheduler_config"] == {"enable_prefix_caching": False}
    assert json.loads(json.dumps(plan)) == plan


def test_plan_follows_the_precision_and_the_recipe_ov_config():
    fp16 = api.plan(openvino_recipe("some/model", **{"precision.dtype": "fp16"}))["plan"]
    assert fp16["export"]["model_loading_kwargs"] == {  # an fp32 checkpoint is compressed when saved
        "torch_dtype": "float16 if the checkpoint stores 16-bit weights, else float32"}
    assert fp16["export"]["ov_config"]["dtype"] == "fp16" and fp16["runtime"]["ov_config"] == {}
    bf16 = api.plan(openvino_recipe("some/model", **{"precision.dtype": "bf16"}))["plan"]
    assert bf16["export"]["model_loading_kwargs"] == {"torch_dtype": "bfloat16"}
    assert bf16["runtime"]["ov_config"] == {"INFERENCE_PRECISION_HINT": "bf16"}
    own = api.plan(openvino_recipe("some/model", **{"openvino.ov_config": {"NUM_STREAMS": 2, "KV_CACHE_PRECISION": "u8"}}))
    assert own["plan"]["runtime"]["ov_config"] == {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "u8",
                                                   "NUM_STREAMS": 2}


def test_static_shapes_take_the_static_path():
    plan = api.plan(openvino_recipe("some/model", **{"shapes.static": True}))["plan"]
    assert plan["static"] is True and plan["backend"] == "openvino" and "export" not in plan


# -- export --------------------------------------------------------------------------------------


def test_export_writes_a_complete_manifest(tiny_b1):
    manifest = artifact.load(tiny_b1)  # re-hashes every file
    assert manifest.target == "openvino" and manifest.shapes == {"batch_size": 1, "sequence_length": 64, "static": False}
    for name in ("openvino", "openvino-tokenizers", "openvino-genai", "optimum-intel"):
        assert manifest.backend_versions[name], name
    assert {"openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml",
            "openvino_config.json", "generation_config.json", "tokenizer.json"} <= set(manifest.files)
    assert all(len(digest) == 64 for digest in manifest.files.values())
    assert manifest.io["inputs"] == {"input_ids": "[1,?]", "attention_mask": "[1,?]", "position_ids": "[1,?]",
                                     "beam_idx": "[1]"}
    assert manifest.io["outputs"]["logits"].startswith("[1,?,") and manifest.io["states"] == 4
    assert manifest.runtime["loader"] == "openvino-genai"
    assert manifest.validation["passed"] and manifest.validation["top1_agreement"] >= 0.99
    assert not list(tiny_b1.parent.glob("*.partial-*")) and not (tiny_b1 / "optimum-export").exists()


def test_model_batch_dimension_is_pinned(untied_b4):
    import openvino as ov

    model = ov.Core().read_model(untied_b4 / "openvino_model.xml")
    for port in model.inputs:
        assert port.get_partial_shape()[0] == ov.Dimension(4), port.get_any_name()
    assert model.input("input_ids").get_partial_shape()[1].is_dynamic


def test_fp32_artifact_compiles_to_fp32(untied_b4):
    import openvino as ov

    manifest = artifact.read_manifest(untied_b4)
    runtime = manifest.runtime
    compiled = ov.Core().compile_model(untied_b4 / runtime["model"], runtime["device"], runtime["ov_config"])
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert compiled.get_property("KV_CACHE_PRECISION") == ov.Type.f32


def test_fp16_artifact_stores_fp16_weights_and_validates(untied_llama, build_artifact):  
    import openvino as ov

    path = export(build_artifact, untied_llama, batch_size=1, sequence_length=64, **{"precision.dtype": "fp16"})
    manifest = artifact.read_manifest(path)
    assert manifest.precision == "fp16" and manifest.validation["passed"]
    model = ov.Core().read_model(path / "openvino_model.xml")
    weights = [op for op in model.get_ops() if op.get_type_name() == "Constant" and len(op.shape) == 2]
    assert weights and all(op.get_element_type() == ov.Type.f16 for op in weights)


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_fp16_export_of_a_16_bit_checkpoint_is_traced_in_fp16(stored, untied_llama, build_artifact, tmp_path):
    """No fp32 copy of a 16-bit checkpoint is made: a 7B fp16 model would need 28 GB for it."""
    import openvino as ov
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt.exporters.openvino import trace_dtype

    checkpoint = tmp_path / stored
    shutil.copytree(untied_llama, checkpoint, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    AutoModelForCausalLM.from_pretrained(untied_llama, dtype=getattr(torch, stored)).save_pretrained(checkpoint)
    assert trace_dtype("fp16", checkpoint) == "float16" and trace_dtype("fp16", untied_llama) == "float32"
    traced: list = []
    import optimum.exporters.openvino as optimum_openvino
    original = optimum_openvino.main_export

    def watched(*args, **kwargs):
        traced.append(kwargs["model_loading_kwargs"]["torch_dtype"])
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optimum_openvino, "main_export", watched)
        path = export(build_artifact, checkpoint, batch_size=1, sequence_length=64, **{"precision.dtype": "fp16"})
    assert traced == [torch.float16]
    manifest = artifact.read_manifest(path)
    assert manifest.precision == "fp16" and manifest.validation["passed"]
    model = ov.Core().read_model(path / "openvino_model.xml")
    weights = [op for op in model.get_ops() if op.get_type_name() == "Constant" and len(op.shape) == 2]
    assert weights and all(op.get_element_type() == ov.Type.f16 for op in weights)


def test_bf16_artifact_is_traced_in_bf16_and_validates(untied_llama, build_artifact):
    """optimum-intel reads ``torch_dtype`` (not transformers' newer ``dtype``) to set up 16-bit tracing."""
    path = export(build_artifact, untied_llama, batch_size=1, sequence_length=64, **{"precision.dtype": "bf16"})
    manifest = artifact.read_manifest(path)
    assert manifest.precision == "bf16" and manifest.validation["passed"]
    assert manifest.runtime["ov_config"]["INFERENCE_PRECISION_HINT"] == "bf16"


def test_artifact_loads_in_plain_openvino_genai(untied_b4, untied_llama):  
    # With no properties at all it runs a string through its own tokenizer and chat template; with
    # the manifest's properties, a single row of token ids (the pinned batch does not bind genai).
    prompt_ids = [1, 17, 42, 99, 7, 300, 12]
    script = (
        "import json, sys, numpy as np, openvino as ov, openvino_genai as genai\n"
        "text = genai.LLMPipeline(sys.argv[1], 'CPU').generate('Hi', genai.GenerationConfig(max_new_tokens=4))\n"
        "assert isinstance(text, str), type(text)\n"
        "properties = json.load(open(sys.argv[1] + '/llmopt.json'))['runtime']['ov_config']\n"
        "pipe = genai.LLMPipeline(sys.argv[1], 'CPU', **properties)\n"
        "ids = np.array([json.loads(sys.argv[2])], dtype=np.int64)\n"
        "inputs = genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))\n"
        "result = pipe.generate(inputs, genai.GenerationConfig(max_new_tokens=12))\n"
        "assert not any(name.startswith('llmopt') for name in sys.modules)\n"
        "print(json.dumps([int(token) for token in result.tokens[0]]))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script, str(untied_b4), json.dumps(prompt_ids)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    tokens = json.loads(completed.stdout.strip().splitlines()[-1])

    from llmopt.runners.pytorch import PyTorchRunner

    reference = PyTorchRunner.from_checkpoint(untied_llama, threads=1)  # generation_config.json's eos, as genai reads it
    expected = reference.generate([prompt_ids], SamplingConfig(max_new_tokens=12)).sequences[0].token_ids
    assert tokens == expected


# -- the real model (greedy parity with PyTorch for every target: tests/test_contract.py) ---------


@pytest.mark.slow
def test_smollm2_tokenizers_and_end_tokens(smollm2, build_artifact):
    """openvino-tokenizers' graphs in the artifact, and openvino-genai's own end tokens (parity: test_contract)."""
    path = build_artifact(smollm2, **{"target": "openvino", "shapes.batch_size": 1, "shapes.sequence_length": 256})
    assert_rows_without_end_tokens_run_to_the_limit(path, "What is the capital of France?")
    import openvino as ov
    import openvino_tokenizers  # noqa: F401  (registers the tokenizer operations with OpenVINO)
    from transformers import AutoTokenizer

    text = "Héllo wörld,\n  naïve café"
    core = ov.Core()
    tokenizer = core.compile_model(path / "openvino_tokenizer.xml", "CPU")
    detokenizer = core.compile_model(path / "openvino_detokenizer.xml", "CPU")
    ids = tokenizer([text])["input_ids"]
    assert ids[0].tolist() == AutoTokenizer.from_pretrained(smollm2).encode(text)
    assert detokenizer(ids)["string_output"].tolist() == [text]


def assert_rows_without_end_tokens_run_to_the_limit(path: Path, prompt: str) -> None:
    """With no end tokens (a fixed-length benchmark) openvino-genai must not stop at its own."""
    runner = api.open_runner(path)
    try:
        batch = [generation.encode_prompt(runner.tokenizer, prompt, chat=True)]
        stopped = runner.generate(batch, SamplingConfig(max_new_tokens=48)).sequences[0]
        assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 48  # the model does end this answer
        runner.eos_token_ids = set()
        free = runner.generate(batch, SamplingConfig(max_new_tokens=48)).sequences[0]
    finally:
        runner.close()
    assert free.finish_reason == "length" and len(free.token_ids) == 48
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids
