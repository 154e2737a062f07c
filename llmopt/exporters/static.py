"""Fully static-shape export (``shapes.static: true``), shared by the onnx and openvino targets.

NPUs and the Neuron/TensorRT compilers want graphs with no dynamic dimension at all, so the
checkpoint becomes two graphs with every dimension fixed by the recipe's batch size B and
sequence length S:

* ``prefill``: the prompt right-padded to S tokens, a host-built additive 4D mask (causal and
  padding) -> logits for every position and the key/value cache of all S slots, stacked over
  layers as [L, B, Hkv, S, D].
* ``decode``: one token per row, the host's S-slot cache as one input per layer and kind
  (``past_key_<i>``, ``past_value_<i>``: [B, Hkv, S, D], views of the host's stacked array, so
  the graph splits nothing) and a mask over the filled slots plus the new token -> its logits
  and its key/value stacked as [L, B, Hkv, 1, D], which the host writes into slot ``position``
  of its cache (``llmopt.runners.static``).

Both are traced from a thin torch wrapper with explicit cache tensors (no stateful cache) using
the TorchScript ONNX exporter with eager attention; transformers returns a ready 4D mask as is.
The ONNX backend stores both graphs with one shared, deduplicated external weights file; the
OpenVINO backend converts the same ONNX graphs to IR, where each graph keeps its own weights.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Any

from llmopt import events
from llmopt._deps import require
from llmopt.errors import RecipeError
from llmopt.exporters import tensorrt_ep
from llmopt.exporters.base import ExportResult
from llmopt.recipe import Recipe

BACKENDS = ("onnx", "openvino")
GRAPHS = ("prefill", "decode")
DEFAULT_OPSET = 17
LOADER = "llmopt-static"
WEIGHTS_FILE = "weights.bin"  # the ONNX backend's external data, shared by both graphs
ONNX_DTYPES = {"fp32": "float32", "fp16": "float16"}
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": tensorrt_ep.PROVIDER}
OV_PRECISION_HINTS = {"fp32": "f32"}  # OpenVINO would otherwise run fp32 IR in bf16 on CPUs that have it
GENAI_ONLY_PROPERTIES = ("ATTENTION_BACKEND",)
# Model dimensions the plan cannot know without reading the checkpoint; export fills them in.
SYMBOLIC_DIMS = {"layers": "num_layers", "kv_heads": "num_kv_heads", "head_dim": "head_dim", "vocab": "vocab_size"}
# Initializers smaller than this stay inside the graph; the rest go to the shared weights file.
EXTERNAL_MIN_BYTES = 1024
ALIGNMENT = 64


def check_static(recipe: Recipe, backend: str) -> None:
    """Raise RecipeError for what the static path cannot build. Pure."""
    if backend not in BACKENDS:
        raise RecipeError(f"static shapes: unknown backend '{backend}'; accepted: {', '.join(BACKENDS)}")
    dtype = recipe.precision.dtype
    if dtype not in ONNX_DTYPES:
        raise RecipeError(
            f"precision.dtype '{dtype}' is not supported with shapes.static for {backend}; accepted: fp32, fp16"
        )
    if recipe.quantization.enabled:
        raise RecipeError(
            f"quantization.weight_format '{recipe.quantization.weight_format}' is not supported with shapes.static yet",
            hint="set quantization.weight_format: none, or shapes.static: false",
        )
    if backend == "onnx" and recipe.onnx.provider == "tensorrt":
        tensorrt_ep.check(recipe)
    elif recipe.onnx.provider_options:
        raise RecipeError("recipe field 'onnx.provider_options': only read with onnx.provider tensorrt")


def graph_shapes(batch_size: int, sequence_length: int, dims: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Every input and output of both graphs: name -> {shape, dtype}. ``dims`` has the SYMBOLIC_DIMS keys."""
    b, s = batch_size, sequence_length
    layers, kv_heads, head_dim, vocab = dims["layers"], dims["kv_heads"], dims["head_dim"], dims["vocab"]
    float_type = ONNX_DTYPES[dtype]
    past = [b, kv_heads, s, head_dim]

    def spec(shape, kind=float_type):
        return {"shape": list(shape), "dtype": kind}

    return {
        "prefill": {
            "inputs": {
                "input_ids": spec([b, s], "int64"),
                "position_ids": spec([b, s], "int64"),
                "attention_mask": spec([b, 1, s, s]),
            },
            "outputs": {
                "logits": spec([b, s, vocab]),
                "present_keys": spec([layers, b, kv_heads, s, head_dim]),
                "present_values": spec([layers, b, kv_heads, s, head_dim]),
            },
        },
        "decode": {
            "inputs": {
                "input_ids": spec([b, 1], "int64"),
                "position_ids": spec([b, 1], "int64"),
                "attention_mask": spec([b, 1, 1, s + 1]),
                **{name: spec(past) for name in past_names(layers)},
            },
            "outputs": {
                "logits": spec([b, 1, vocab]),
                "new_keys": spec([layers, b, kv_heads, 1, head_dim]),
                "new_values": spec([layers, b, kv_heads, 1, head_dim]),
            },
        },
    }


def past_names(layers: int | str) -> list[str]:
    """The decode graph's cache inputs: every layer's keys, then every layer's values."""
    indices = range(layers) if isinstance(layers, int) else ["<layer>"]  # the plan does not know L
    return [f"past_{kind}_{index}" for kind in ("key", "value") for index in indices]


def graph_files(backend: str) -> dict[str, list[str]]:
    if backend == "onnx":
        return {name: [f"{name}.onnx", WEIGHTS_FILE] for name in GRAPHS}
    return {name: [f"{name}.xml", f"{name}.bin"] for name in GRAPHS}


def opset_of(recipe: Recipe) -> int:
    return recipe.onnx.opset or DEFAULT_OPSET


def runtime_options(recipe: Recipe, backend: str) -> dict[str, Any]:
    """How the runner opens the graphs: recorded in the manifest, read by llmopt.runners.static."""
    runtime: dict[str, Any] = {
        "loader": LOADER,
        "backend": backend,
        "graphs": {name: files[0] for name, files in graph_files(backend).items()},
    }
    if backend == "onnx":
        runtime["providers"] = [ORT_PROVIDERS[recipe.onnx.provider]]
        if recipe.onnx.provider == "tensorrt":  # the EPContext models export writes, loaded with the engine inside
            runtime["providers"] = [[tensorrt_ep.PROVIDER, tensorrt_ep.load_options(recipe)]]
            runtime["graphs"] = {name: f"{name}{tensorrt_ep.CONTEXT_SUFFIX}" for name in GRAPHS}
    else:
        ov_config: dict[str, Any] = {}
        if recipe.precision.dtype in OV_PRECISION_HINTS:
            ov_config["INFERENCE_PRECISION_HINT"] = OV_PRECISION_HINTS[recipe.precision.dtype]
        # The recipe's own settings win; those meant for the openvino-genai pipeline do not apply here.
        ov_config.update({key: value for key, value in recipe.openvino.ov_config.items() if key not in GENAI_ONLY_PROPERTIES})
        runtime.update(device=recipe.openvino.device, ov_config=ov_config)
    return runtime


def static_plan(recipe: Recipe, backend: str) -> dict[str, Any]:
    """The graphs, their exact shapes and the conversion steps, as JSON-able data. Pure."""
    check_static(recipe, backend)
    shapes = recipe.shapes
    steps = [
        f"transformers AutoModelForCausalLM.from_pretrained(dtype={ONNX_DTYPES[recipe.precision.dtype]}, "
        "attn_implementation=eager)",
        f"torch.onnx.export(dynamo=False, opset_version={opset_of(recipe)}) of the prefill and decode wrappers",
    ]
    if backend == "onnx":
        steps.append(f"share deduplicated weights of both graphs in {WEIGHTS_FILE} (ONNX external data)")
    else:
        compress = recipe.precision.dtype == "fp16"
        steps.append(f"openvino.convert_model(<graph>.onnx) then openvino.save_model(compress_to_fp16={compress})")
    io = graph_shapes(shapes.batch_size, shapes.sequence_length, SYMBOLIC_DIMS, recipe.precision.dtype)
    plan = {
        "static": True,
        "backend": backend,
        "graphs": graph_files(backend),
        "io": io,
        "opset": opset_of(recipe),
        "dtype": recipe.precision.dtype,
        "steps": steps,
        "runtime": runtime_options(recipe, backend),
    }
    if backend == "onnx" and recipe.onnx.provider == "tensorrt":
        steps.append("onnxruntime.InferenceSession(<graph>.onnx, providers=[(TensorrtExecutionProvider, build)]) "
                     "writes <graph>_ctx.onnx with the engine embedded; the plain graphs are removed")
        plan["tensorrt"] = tensorrt_ep.plan(recipe, {name: {"inputs": io[name]["inputs"]} for name in GRAPHS})
    return plan


# --------------------------------------------------------------------------- export


def model_dims(config) -> dict[str, int]:
    heads = config.num_attention_heads
    return {
        "layers": config.num_hidden_layers,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab": config.vocab_size,
    }


def _check_config(config, sequence_length: int) -> None:
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and positions < sequence_length:
        raise RecipeError(
            f"shapes.sequence_length {sequence_length} exceeds the model's context length ({positions})",
            hint=f"use shapes.sequence_length <= {positions}",
        )
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and window < sequence_length:
        raise RecipeError(
            f"shapes.static: the model's sliding window ({window}) is shorter than shapes.sequence_length "
            f"({sequence_length}); the static graphs mask causally only",
            hint=f"use shapes.sequence_length <= {window}",
        )


def _wrappers(torch, model, sequence_length: int):
    """The prefill and decode modules: explicit cache tensors in and out, transformers inside."""
    from transformers import DynamicCache

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, attention_mask):
            cache = DynamicCache()
            output = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                past_key_values=cache, use_cache=True,
                                cache_position=torch.arange(sequence_length))
            keys = torch.stack([layer.keys for layer in cache.layers])
            values = torch.stack([layer.values for layer in cache.layers])
            return output.logits, keys, values

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, attention_mask, *past):
            layers = len(past) // 2
            cache = DynamicCache(ddp_cache_data=list(zip(past[:layers], past[layers:])))
            output = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                past_key_values=cache, use_cache=True,
                                cache_position=torch.tensor([sequence_length]))
            keys = torch.stack([layer.keys[:, :, -1:, :] for layer in cache.layers])
            values = torch.stack([layer.values[:, :, -1:, :] for layer in cache.layers])
            return output.logits, keys, values

    return Prefill().eval(), Decode().eval()


def _example_inputs(torch, io: dict[str, Any], dtype) -> tuple:
    """Zeros of the exact input shapes (an all-visible mask traces the same graph as any other)."""
    tensors = []
    for spec in io["inputs"].values():
        kind = torch.int64 if spec["dtype"] == "int64" else dtype
        tensors.append(torch.zeros(spec["shape"], dtype=kind))
    return tuple(tensors)


def _trace_to_onnx(recipe: Recipe, checkpoint: Path, directory: Path, backend: str) -> dict[str, Any]:
    """Export both graphs as plain ONNX files into ``directory``; returns the concrete io."""
    torch = require("torch", extra="pytorch")
    transformers = require("transformers", extra="pytorch")
    require("onnx", extra=backend)  # torch's TorchScript exporter writes through it (openvino gets it via optimum-intel)
    dtype = getattr(torch, ONNX_DTYPES[recipe.precision.dtype])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation="eager",
        trust_remote_code=recipe.model.trust_remote_code,
    ).eval()
    model.config.use_cache = True
    _check_config(model.config, recipe.shapes.sequence_length)
    io = graph_shapes(recipe.shapes.batch_size, recipe.shapes.sequence_length, model_dims(model.config),
                      recipe.precision.dtype)
    wrappers = dict(zip(GRAPHS, _wrappers(torch, model, recipe.shapes.sequence_length)))
    for name, module in wrappers.items():
        with events.step(f"trace-{name}", f"tracing the {name} graph"), torch.no_grad(), warnings.catch_warnings():
            # The empty cache tensors and cache_position are constants on purpose: every shape is fixed.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module, _example_inputs(torch, io[name], dtype), str(directory / f"{name}.onnx"),
                input_names=list(io[name]["inputs"]), output_names=list(io[name]["outputs"]),
                opset_version=opset_of(recipe), dynamo=False, do_constant_folding=True,
            )
    return io


def _share_weights(directory: Path, workdir: Path) -> None:
    """Write both graphs into ``workdir`` with their large initializers in one deduplicated file."""
    onnx = require("onnx", extra="onnx")
    from onnx.external_data_helper import set_external_data

    stored: dict[bytes, tuple[int, int]] = {}
    with (workdir / WEIGHTS_FILE).open("wb") as weights:
        for name in GRAPHS:
            model = onnx.load(str(directory / f"{name}.onnx"), load_external_data=True)
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
                    continue
                key = hashlib.sha256(tensor.raw_data).digest() + tensor.data_type.to_bytes(1, "little")
                if key not in stored:
                    weights.write(b"\0" * (-weights.tell() % ALIGNMENT))
                    stored[key] = (weights.tell(), len(tensor.raw_data))
                    weights.write(tensor.raw_data)
                offset, length = stored[key]
                set_external_data(tensor, WEIGHTS_FILE, offset=offset, length=length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, str(workdir / f"{name}.onnx"))


def _convert_to_openvino(recipe: Recipe, directory: Path, workdir: Path) -> None:
    ov = require("openvino", extra="openvino")
    for name in GRAPHS:
        with events.step(f"convert-{name}", f"converting the {name} graph to OpenVINO IR"):
            model = ov.convert_model(str(directory / f"{name}.onnx"))
            ov.save_model(model, str(workdir / f"{name}.xml"), compress_to_fp16=recipe.precision.dtype == "fp16")


def export_static(recipe: Recipe, checkpoint: Path, workdir: Path, backend: str) -> ExportResult:
    """Build the prefill and decode graphs for ``backend`` into ``workdir``."""
    check_static(recipe, backend)
    workdir = Path(workdir)
    # The raw traces go next to the artifact (same disk, possibly large) and are removed here.
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=workdir) as scratch:
        directory = Path(scratch)
        io = _trace_to_onnx(recipe, Path(checkpoint), directory, backend)
        if backend == "onnx":
            _share_weights(directory, workdir)
        else:
            _convert_to_openvino(recipe, directory, workdir)
    runtime = runtime_options(recipe, backend)
    if backend == "onnx" and recipe.onnx.provider == "tensorrt":
        runtime.update(tensorrt_ep.compile_graphs(recipe, workdir, io, graph_files("onnx")))
    return ExportResult(io=io, runtime=runtime)
