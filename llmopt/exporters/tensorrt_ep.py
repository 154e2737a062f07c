"""Static ONNX graphs compiled to TensorRT engines by onnxruntime's TensorRT execution provider.

``target: onnx`` with ``shapes.static: true`` and ``onnx.provider: tensorrt``: the two fully static
graphs of ``llmopt.exporters.static`` (prefill and decode, no dynamic dimension) are built into
TensorRT engines at export time and saved into the artifact as EPContext models
(``prefill_ctx.onnx``, ``decode_ctx.onnx``): an ONNX graph whose single ``EPContext`` node holds the
serialized engine (``trt_ep_context_embed_mode: 1``). Loading one deserializes the engine instead
of building it again, so a CI job compiles once and every machine with the same GPU architecture
and TensorRT version loads it in seconds. This route does not depend on TensorRT-LLM's engine
builder, which NVIDIA removed from TensorRT-LLM's main branch in 2026 (see ``llmopt.exporters.tensorrt``).

The optimization profile of every input is pinned to the recipe's shapes (min = opt = max), the
engine's precision follows ``precision.dtype``, and ``onnx.provider_options`` adds any other
TensorRT EP option by its documented name. Building needs an NVIDIA GPU, onnxruntime-gpu and
TensorRT; the manifest records the GPU and TensorRT version the engines are tied to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmopt import events
from llmopt._deps import require, version_of
from llmopt.errors import MissingDependencyError, RecipeError
from llmopt.gpu import TENSORRT_EP, check_session_provider, gpu_record, installed_tensorrt_version, require_gpu
from llmopt.recipe import Recipe

PROVIDER = TENSORRT_EP
CONTEXT_SUFFIX = "_ctx.onnx"
GPU_HINT = "pip install 'llmopt[gpu]' (onnxruntime-gpu) and TensorRT on a machine with an NVIDIA GPU"

# The TensorRT EP's provider options a recipe may name, as onnxruntime-gpu 1.31.1 (the newest GPU
# build on the package registry) parses them; the memory-pointer options (user compute stream, ONNX
# and weight byte streams) have no meaning in a recipe. tests/test_vendor_conformance.py checks the
# list against the option strings of the published wheel (tests/vendor/onnxruntime-gpu-1.31.1-tensorrt-ep.json).
OPTIONS = frozenset({
    "device_id", "trt_auxiliary_streams", "trt_bf16_enable", "trt_build_heuristics_enable",
    "trt_builder_optimization_level", "trt_context_memory_sharing_enable", "trt_cuda_graph_enable",
    "trt_detailed_build_log", "trt_dla_core", "trt_dla_enable", "trt_dump_ep_context_model", "trt_dump_subgraphs",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_engine_decryption_enable",
    "trt_engine_decryption_lib_path", "trt_engine_hw_compatible", "trt_ep_context_embed_mode",
    "trt_ep_context_file_path", "trt_extra_plugin_lib_paths", "trt_force_sequential_engine_build",
    "trt_force_timing_cache", "trt_fp16_enable", "trt_int8_calibration_table_name", "trt_int8_enable",
    "trt_int8_use_native_calibration_table", "trt_layer_norm_fp32_fallback", "trt_load_user_initializer",
    "trt_max_partition_iterations", "trt_max_workspace_size", "trt_min_subgraph_size", "trt_onnx_model_folder_path",
    "trt_op_types_to_exclude", "trt_preview_features", "trt_profile_max_shapes", "trt_profile_min_shapes",
    "trt_profile_opt_shapes", "trt_sparsity_enable", "trt_tactic_sources", "trt_timing_cache_enable",
    "trt_timing_cache_path", "trt_weight_stripped_engine_enable",
})
# Options llmopt sets from recipe fields, or needs as they are to write the artifact.
RESERVED = {
    "trt_fp16_enable": "precision.dtype", "trt_bf16_enable": "precision.dtype",
    "trt_profile_min_shapes": "shapes", "trt_profile_opt_shapes": "shapes", "trt_profile_max_shapes": "shapes",
    "trt_dump_ep_context_model": "llmopt (the artifact is the EPContext model)",
    "trt_ep_context_file_path": "llmopt (the artifact is the EPContext model)",
    "trt_ep_context_embed_mode": "llmopt (the engine is embedded in the artifact)",
    "trt_engine_cache_enable": "llmopt (the engine is embedded in the artifact, no cache beside it)",
    "trt_engine_cache_path": "llmopt (the engine is embedded in the artifact, no cache beside it)",
}


def check(recipe: Recipe) -> None:
    """Refuse what the TensorRT EP route cannot honour. Pure."""
    if recipe.precision.dtype not in ("fp32", "fp16"):
        raise RecipeError(f"recipe field 'precision.dtype': {recipe.precision.dtype} is not available with "
                          "onnx.provider tensorrt and shapes.static; accepted: fp32, fp16")
    for key in recipe.onnx.provider_options:
        if key in RESERVED:
            raise RecipeError(f"recipe field 'onnx.provider_options.{key}': set by {RESERVED[key]}, not here")
        if key not in OPTIONS:
            raise RecipeError(f"recipe field 'onnx.provider_options.{key}': not a TensorRT execution provider option "
                              f"of onnxruntime; accepted: {', '.join(sorted(OPTIONS - set(RESERVED)))}")


def profile(inputs: dict[str, Any]) -> str:
    """onnxruntime's profile string, ``name:1x512,other:1x1x512x512``, of a graph's static inputs."""
    return ",".join(f"{name}:{'x'.join(str(size) for size in spec['shape'])}" for name, spec in inputs.items())


def build_options(recipe: Recipe, inputs: dict[str, Any], context_file: str) -> dict[str, Any]:
    """Provider options that build one graph's engine and write it as an EPContext model."""
    shapes = profile(inputs)
    return {
        "device_id": 0,
        "trt_fp16_enable": recipe.precision.dtype == "fp16",
        "trt_profile_min_shapes": shapes,
        "trt_profile_opt_shapes": shapes,
        "trt_profile_max_shapes": shapes,
        "trt_dump_ep_context_model": True,
        "trt_ep_context_file_path": context_file,
        "trt_ep_context_embed_mode": 1,
        **recipe.onnx.provider_options,
    }


def load_options(recipe: Recipe) -> dict[str, Any]:
    """Provider options that load the EPContext models (the engine inside is used as it is)."""
    return {"device_id": 0, "trt_fp16_enable": recipe.precision.dtype == "fp16", **recipe.onnx.provider_options}


def plan(recipe: Recipe, io: dict[str, Any]) -> dict[str, Any]:
    """The build, as data: per graph the exact provider options, and what the artifact keeps."""
    return {
        "provider": PROVIDER,
        "build": {name: build_options(recipe, graph["inputs"], f"<artifact>/{name}{CONTEXT_SUFFIX}")
                  for name, graph in io.items()},
        "artifact": {name: f"{name}{CONTEXT_SUFFIX}" for name in io},
        "load_options": load_options(recipe),
        "needs": "an NVIDIA GPU, onnxruntime-gpu with TensorRT; the engines run only on that GPU architecture "
                 "and TensorRT version",
    }


def compile_graphs(recipe: Recipe, workdir: Path, io: dict[str, Any], graph_files: dict[str, list[str]]) -> dict[str, Any]:
    """Build every graph in ``workdir`` into an EPContext model, then remove the plain graphs; returns the
    manifest's record of the GPU and TensorRT version the engines are tied to."""
    ort = require("onnxruntime", extra="gpu", package="onnxruntime-gpu")
    gpu = require_gpu(workdir, "tensorrt", GPU_HINT)
    for name, graph in io.items():
        context_file = workdir / f"{name}{CONTEXT_SUFFIX}"
        options = build_options(recipe, graph["inputs"], str(context_file))
        with events.step(f"trt-{name}", f"building the {name} TensorRT engine on {gpu.name}"):
            session = ort.InferenceSession(str(workdir / graph_files[name][0]), providers=[(PROVIDER, options)])
            check_session_provider(session, PROVIDER, f"building the {name} engine", GPU_HINT)
            del session
        if not context_file.is_file():
            raise MissingDependencyError(f"onnxruntime wrote no EPContext model for the {name} graph "
                                         f"({context_file.name}); this onnxruntime cannot dump TensorRT engines")
    for files in graph_files.values():
        for file in files:
            (workdir / file).unlink(missing_ok=True)
    return {  # the runtime's providers and graphs are static.runtime_options'; these are what the engines need
        "gpu": gpu_record(gpu),
        "versions": {"tensorrt": installed_tensorrt_version(), "onnxruntime": version_of("onnxruntime")},
    }
