"""Fully static-shape artifacts (``shapes.static: true``) for the onnx and openvino targets.

Pure tests (plan, check) run anywhere; the rest export small artifacts through ``api.export`` and
need the target's extra. What every target must do (parity, pinned batches, limits, sampling,
verify, SmolLM2) is in tests/test_contract.py, where the static graphs are targets of their own. They run on ``context_llama``, tiny_llama with a wider random init: tiny_llama's
greedy output only repeats a token, this one's depends on the context. The cache handling is also
checked step by step against PyTorch's logits (teacher forcing).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from llmopt import api, artifact
from llmopt.errors import RecipeError
from llmopt.recipe import resolve
from llmopt.runners.base import SamplingConfig
from tests.conftest import build_untied_llama

SEQUENCE_LENGTH = 64
BACKEND_LIBRARIES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
BACKENDS = [pytest.param("onnx", marks=pytest.mark.onnx), pytest.param("openvino", marks=pytest.mark.openvino)]
PROMPTS = [  # different lengths, so rows are padded and decode at different positions
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Compilers turn programs into machine code; runtimes execute them quickly.",
    "def generate(tokens):\n    return model(tokens)",
]


def needs(backend: str) -> None:
    for module in BACKEND_LIBRARIES[backend]:
        pytest.importorskip(module, reason=f"the {backend} extra is not installed: pip install 'llmopt[{backend}]'")


def static_recipe(model: Path | str, backend: str, batch_size: int = 1, sequence_length: int = SEQUENCE_LENGTH, **overrides):
    return resolve(None, {"model.id": str(model), "target": backend, "shapes.static": True,
                          "shapes.sequence_length": sequence_length, "shapes.batch_size": batch_size, **overrides})


@pytest.fixture(scope="module")
def context_llama(tiny_llama, tmp_path_factory) -> Path:
    return build_untied_llama(tiny_llama, tmp_path_factory.mktemp("context-llama"), seed=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """export(model, backend, batch_size) -> artifact path, each built once per module."""
    built: dict[tuple, Path] = {}

    def export(model: Path, backend: str, batch_size: int, sequence_length: int = SEQUENCE_LENGTH) -> Path:
        needs(backend)
        key = (str(model), backend, batch_size, sequence_length)
        if key not in built:
            output = tmp_path_factory.mktemp("static") / f"{backend}-b{batch_size}-s{sequence_length}"
            api.export(static_recipe(model, backend, batch_size, sequence_length), output)
            built[key] = output
        return built[key]

    return export


def encode(tokenizer, prompts: list[str], batch_size: int) -> list[list[int]]:
    batch = [tokenizer.encode(prompt) for prompt in prompts][:batch_size]
    return batch + [batch[-1]] * (batch_size - len(batch))


def pytorch_greedy(checkpoint: Path, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """PyTorch's greedy tokens per row; computed once per input, since both backends compare with it."""
    return [list(tokens) for tokens in _pytorch_greedy(checkpoint, tuple(map(tuple, batch)), max_new_tokens)]


@functools.lru_cache(maxsize=None)
def _pytorch_greedy(checkpoint: Path, batch: tuple, max_new_tokens: int) -> tuple:
    from llmopt.runners.pytorch import PyTorchRunner

    runner = PyTorchRunner.from_checkpoint(checkpoint, batch_size=len(batch), threads=1)
    try:
        output = runner.generate([list(ids) for ids in batch], SamplingConfig(max_new_tokens=max_new_tokens))
    finally:
        runner.close()
    return tuple(tuple(sequence.token_ids) for sequence in output.sequences)


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_plan_names_two_graphs_with_only_fixed_dimensions(backend):
    plan = api.plan(static_recipe("some/model", backend, batch_size=4, sequence_length=128))["plan"]
    assert plan["static"] is True and plan["backend"] == backend and plan["opset"] >= 17
    prefill, decode = plan["io"]["prefill"], plan["io"]["decode"]
    assert prefill["inputs"]["input_ids"]["shape"] == [4, 128]
    assert prefill["inputs"]["attention_mask"]["shape"] == [4, 1, 128, 128]
    assert decode["inputs"]["input_ids"]["shape"] == [4, 1]
    assert decode["inputs"]["attention_mask"]["shape"] == [4, 1, 1, 129]
    assert decode["inputs"]["past_key_<layer>"]["shape"] == [4, "num_kv_heads", 128, "head_dim"]
    assert list(decode["inputs"])[3:] == ["past_key_<layer>", "past_value_<layer>"]
    assert decode["outputs"]["new_keys"]["shape"] == ["num_layers", 4, "num_kv_heads", 1, "head_dim"]
    files = {"onnx": ["prefill.onnx", "decode.onnx"], "openvino": ["prefill.xml", "decode.xml"]}[backend]
    assert [plan["graphs"][name][0] for name in ("prefill", "decode")] == files


def test_openvino_plan_pins_fp32_inference_precision():
    runtime = api.plan(static_recipe("some/model", "openvino"))["plan"]["runtime"]
    assert runtime["ov_config"] == {"INFERENCE_PRECISION_HINT": "f32"}
    overrides = {"openvino.ov_config": {"NUM_STREAMS": 1, "ATTENTION_BACKEND": "SDPA"}}  # the latter is openvino-genai's
    runtime = api.plan(static_recipe("some/model", "openvino", batch_size=2, **overrides))["plan"]["runtime"]
    assert runtime["ov_config"] == {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
@pytest.mark.parametrize("field, value, words", [
    ("precision.dtype", "bf16", "accepted: fp32, fp16"),
    ("quantization.weight_format", "int8", "not supported with shapes.static"),
])
def test_static_refuses_what_it_cannot_build(backend, field, value, words):
    with pytest.raises(RecipeError, match=words):
        api.plan(static_recipe("some/model", backend, **{field: value}))


# --------------------------------------------------------------------------- exported graphs


def graph_dims(path: Path, backend: str) -> dict[str, dict[str, dict[str, list]]]:
    """Every input and output dimension as stored in the graph files (None for a dynamic one)."""
    dims = {}
    for graph in ("prefill", "decode"):
        if backend == "onnx":
            import onnx

            model = onnx.load(str(path / f"{graph}.onnx"), load_external_data=False)
            read = lambda values: {v.name: [d.dim_value if d.HasField("dim_value") else None  # noqa: E731
                                            for d in v.type.tensor_type.shape.dim] for v in values}
            dims[graph] = {"inputs": read(model.graph.input), "outputs": read(model.graph.output)}
        else:
            import openvino as ov

            model = ov.Core().read_model(str(path / f"{graph}.xml"))
            read = lambda ports: {p.get_any_name(): [d.get_length() if d.is_static else None  # noqa: E731
                                                     for d in p.get_partial_shape()] for p in ports}
            dims[graph] = {"inputs": read(model.inputs), "outputs": read(model.outputs)}
    return dims


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_graph_dimension_is_fixed_to_the_recipe(context_llama, exported, backend, batch_size):
    path = exported(context_llama, backend, batch_size)
    manifest = artifact.load(path)
    assert manifest.static and manifest.runtime["loader"] == "llmopt-static"
    dims = graph_dims(path, backend)
    expected = {graph: {side: {name: spec["shape"] for name, spec in ports.items()} for side, ports in io.items()}
                for graph, io in manifest.io.items()}
    assert dims == expected
    config = json.loads((context_llama / "config.json").read_text())
    layers = config["num_hidden_layers"]
    cache = [batch_size, config["num_key_value_heads"], SEQUENCE_LENGTH, config["hidden_size"] // config["num_attention_heads"]]
    assert dims["prefill"]["inputs"]["input_ids"] == [batch_size, SEQUENCE_LENGTH]
    assert dims["prefill"]["outputs"]["present_keys"] == [layers, *cache]
    assert list(dims["decode"]["inputs"])[3:] == [f"past_{kind}_{layer}" for kind in ("key", "value") for layer in range(layers)]
    assert all(dims["decode"]["inputs"][f"past_value_{layer}"] == cache for layer in range(layers))
    assert dims["decode"]["inputs"]["attention_mask"] == [batch_size, 1, 1, SEQUENCE_LENGTH + 1]
    assert dims["decode"]["outputs"]["logits"] == [batch_size, 1, config["vocab_size"]]


@pytest.mark.onnx
def test_onnx_graphs_share_one_weights_file(context_llama, exported):
    import onnx

    path = exported(context_llama, "onnx", 1)
    locations = set()
    for graph in ("prefill", "decode"):
        model = onnx.load(str(path / f"{graph}.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    assert locations == {"weights.bin"}
    assert sorted(file.name for file in path.glob("*.onnx*")) == ["decode.onnx", "prefill.onnx"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_export_validates_against_pytorch(context_llama, exported, backend, batch_size):
    validation = artifact.load(exported(context_llama, backend, batch_size)).validation
    assert validation["passed"] and validation["top1_agreement"] == 1.0 and validation["mean_kl"] < 1e-6
    assert validation["tokens"] == SEQUENCE_LENGTH


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_exports_fp16_graphs(context_llama, tmp_path, backend):
    needs(backend)
    path = tmp_path / "fp16"
    report = api.export(static_recipe(context_llama, backend, 2, **{"precision.dtype": "fp16"}), path)
    assert report.manifest.validation["passed"]
    assert report.manifest.io["decode"]["inputs"]["past_key_0"]["dtype"] == "float16"
    runner = api.open_runner(path)
    assert runner.float_type == np.float16
    batch = encode(runner.tokenizer, PROMPTS, 2)
    output = runner.generate(batch, SamplingConfig(max_new_tokens=8))
    assert all(1 <= len(sequence.token_ids) <= 8 for sequence in output.sequences)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_tokens_equal_pytorch(context_llama, exported, backend, batch_size):
    runner = api.open_runner(exported(context_llama, backend, batch_size))
    assert type(runner).__name__ == {"onnx": "OnnxStaticRunner", "openvino": "OpenVINOStaticRunner"}[backend]
    batch = encode(runner.tokenizer, PROMPTS, batch_size)
    new_tokens = SEQUENCE_LENGTH - max(len(ids) for ids in batch)
    output = runner.generate(batch, SamplingConfig(max_new_tokens=new_tokens))
    reference = pytorch_greedy(context_llama, batch, new_tokens)
    assert [sequence.token_ids for sequence in output.sequences] == reference
    for sequence in output.sequences:
        assert sequence.finish_reason == ("stop" if sequence.token_ids[-1] in runner.eos_token_ids else "length")
    assert len(set(output.sequences[-1].token_ids)) > 3  # a context-dependent text, not one repeated token
    assert output.ttft_s > 0 and output.decode_s > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_steps_match_pytorch_logits(context_llama, exported, backend):
    """Prefill, then feed a fixed continuation one token per step: each step's logits equal PyTorch's."""
    import torch
    from transformers import AutoModelForCausalLM

    runner = api.open_runner(exported(context_llama, backend, 4))
    batch = encode(runner.tokenizer, PROMPTS, 4)
    continuation = runner.tokenizer.encode(" and then the compiler ran.")[:8]
    model = AutoModelForCausalLM.from_pretrained(context_llama, dtype=torch.float32).eval()
    lengths = np.array([len(ids) for ids in batch])
    logits, keys, values = runner.prefill(batch)
    keys, values = np.array(keys), np.array(values)
    steps = [logits[np.arange(4), lengths - 1]]
    for offset, token in enumerate(continuation):
        tokens = np.full(4, token, dtype=np.int64)
        steps.append(runner.decode_one_token(tokens, lengths + offset, keys, values))
    for row, prompt in enumerate(batch):
        with torch.no_grad():
            expected = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1:].numpy()
        np.testing.assert_allclose(np.stack([step[row] for step in steps]), expected, atol=2e-4, rtol=1e-4)
