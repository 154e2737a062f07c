"""OpenVINO weight compression with NNCF (``nncf.compress_weights`` on the stateful IR).

int8 is per output channel (NNCF has no int8 groups); int4 is group-wise, with ``ratio`` of the
layers in int4 and the rest, embeddings and the last MatMul included, in int8 (``all_layers``
puts those in int4 too). Data-aware options (AWQ, scale estimation, GPTQ, a sensitivity metric
for mixed precision) run the fp IR on calibration text from ``llmopt.quantize.calibration``:
each sample is a prefill followed by a few single-token decode steps through the model's own
key/value state, so the statistics see both kinds of call the pipeline makes.

Plain int4 round-to-nearest turns a model as small as SmolLM2-135M into a repetition loop, so
``algorithm: auto`` with int4 means AWQ with scale estimation on the shipped calibration set.
The key/value cache precision and any ``openvino.ov_config`` go into the runtime options; an
int8 or int4 artifact keeps the device's u8 cache unless ``quantization.kv_cache`` says otherwise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llmopt import events
from llmopt._deps import require
from llmopt.errors import RecipeError
from llmopt.exporters.base import ExportResult
from llmopt.quantize import calibration, check_source, choose_group_size, matmul_input_sizes, read_config
from llmopt.recipe import Recipe

MODEL_FILE = "openvino_model.xml"
FORMATS = ("int8", "int4")
ALGORITHMS = ("auto", "rtn", "awq", "gptq")
# quantization.kv_cache -> KV_CACHE_PRECISION; "auto" keeps the CPU plugin's own choice (u8) for quantized weights.
KV_CACHE_PRECISIONS = {"auto": "u8", "u8": "u8", "int8": "u8", "fp16": "f16", "fp32": "f32"}
SENSITIVITY_METRICS = (
    "weight_quantization_error",
    "hessian_input_activation",
    "mean_activation_variance",
    "max_activation_variance",
    "mean_activation_magnitude",
)
DATA_FREE_METRICS = ("weight_quantization_error",)
DEFAULT_DATASET = "default"
CALIBRATION_TOKENS = 128  # prefill length of one calibration sample
DECODE_STEPS = 3  # single-token steps after each prefill, fed the text's next tokens


# -- pure: check and plan ---------------------------------------------------------------------


def check(recipe: Recipe) -> None:
    """RecipeError for what NNCF on OpenVINO cannot build. Pure."""
    q = recipe.quantization
    if not q.enabled:
        return
    if q.weight_format not in FORMATS:
        raise RecipeError(
            f"quantization.weight_format '{q.weight_format}' is not supported by the openvino target on "
            f"{recipe.openvino.device}; accepted: {', '.join(FORMATS)}",
            hint="fp8 weights need a GPU target (tensorrt)" if q.weight_format == "fp8" else None,
        )
    if recipe.shapes.static:
        raise RecipeError(
            "quantization with shapes.static is not supported by the openvino target yet",
            hint="set shapes.static: false, or quantization.weight_format: none",
        )
    if q.algorithm not in ALGORITHMS:
        raise RecipeError(f"quantization.algorithm '{q.algorithm}' is not supported by the openvino target; "
                          f"accepted: {', '.join(ALGORITHMS)}")
    if q.kv_cache not in KV_CACHE_PRECISIONS:
        raise RecipeError(f"quantization.kv_cache '{q.kv_cache}' is not supported by the openvino target; "
                          f"accepted: {', '.join(KV_CACHE_PRECISIONS)}")
    if q.sensitivity_metric is not None and q.sensitivity_metric not in SENSITIVITY_METRICS:
        raise RecipeError(f"quantization.sensitivity_metric '{q.sensitivity_metric}' is not an NNCF metric; "
                          f"accepted: {', '.join(SENSITIVITY_METRICS)}")
    if q.weight_format == "int8":
        int4_only = {
            "group_size": q.group_size not in (None, -1),
            "ratio": q.ratio != 1.0,
            "awq": q.awq,
            "scale_estimation": q.scale_estimation,
            "algorithm": q.algorithm not in ("auto", "rtn"),
            "sensitivity_metric": q.sensitivity_metric is not None,
            "all_layers": q.all_layers,
        }
        given = [name for name, used in int4_only.items() if used]
        if given:
            raise RecipeError(
                f"quantization.{given[0]} applies to int4 only: openvino int8 is per-channel round-to-nearest",
                hint=f"set quantization.weight_format: int4, or remove quantization.{given[0]}",
            )
        return
    if q.algorithm == "rtn" and (q.awq or q.scale_estimation):
        flag = "awq" if q.awq else "scale_estimation"
        raise RecipeError(f"quantization.{flag} contradicts quantization.algorithm 'rtn' (data-free round-to-nearest)",
                          hint=f"set quantization.algorithm: auto, or remove quantization.{flag}")
    if q.sensitivity_metric is not None and q.ratio == 1.0:
        raise RecipeError("quantization.sensitivity_metric ranks layers for mixed precision: it needs quantization.ratio < 1",
                          hint="e.g. quantization.ratio: 0.8 (80% of layers in int4, the rest int8)")


def compression_arguments(recipe: Recipe, group_size: int | str = "<chosen at export>") -> dict[str, Any]:
    """The ``nncf.compress_weights`` arguments for the recipe (dataset as its name). Pure."""
    q = recipe.quantization
    mode = f"{q.weight_format}_{'sym' if sym_of(recipe) else 'asym'}"
    arguments: dict[str, Any] = {"mode": mode}
    if q.weight_format == "int8":
        return arguments
    awq, scale_estimation, gptq = algorithms_of(recipe)
    arguments.update(group_size=group_size, ratio=q.ratio, all_layers=q.all_layers,
                     awq=awq, scale_estimation=scale_estimation, gptq=gptq)
    if q.sensitivity_metric is not None:
        arguments["sensitivity_metric"] = q.sensitivity_metric
    if needs_data(recipe):
        arguments.update(dataset=q.dataset or DEFAULT_DATASET, subset_size=q.num_samples * (1 + DECODE_STEPS))
    return arguments


def sym_of(recipe: Recipe) -> bool:
    """Asymmetric by default: its zero point follows the checkpoint's (often shifted) weight ranges."""
    return bool(recipe.quantization.symmetric) if recipe.quantization.symmetric is not None else False


def algorithms_of(recipe: Recipe) -> tuple[bool, bool, bool]:
    """(awq, scale_estimation, gptq) for an int4 recipe."""
    q = recipe.quantization
    explicit = q.model_fields_set
    if q.algorithm == "rtn":
        return False, False, False
    if q.algorithm == "gptq":
        return bool(q.awq), bool(q.scale_estimation), True
    # auto and awq: AWQ with scale estimation unless the recipe turned one off explicitly.
    awq = q.awq if "awq" in explicit else True
    scale_estimation = q.scale_estimation if "scale_estimation" in explicit else True
    return awq, scale_estimation, False


def needs_data(recipe: Recipe) -> bool:
    q = recipe.quantization
    if q.weight_format != "int4":
        return False
    awq, scale_estimation, gptq = algorithms_of(recipe)
    metric_needs_data = q.sensitivity_metric is not None and q.sensitivity_metric not in DATA_FREE_METRICS
    return awq or scale_estimation or gptq or metric_needs_data or q.dataset is not None


def kv_cache_precision(recipe: Recipe) -> str:
    return KV_CACHE_PRECISIONS[recipe.quantization.kv_cache]


def runtime_ov_config(recipe: Recipe, base: dict[str, Any]) -> dict[str, Any]:
    """The artifact's ov_config: the fp export's, the cache precision, then the recipe's own settings."""
    ov_config = {**base, "KV_CACHE_PRECISION": kv_cache_precision(recipe)}
    ov_config.update(recipe.openvino.ov_config)
    return ov_config


def plan(recipe: Recipe) -> dict[str, Any]:
    """The fp export, then the NNCF call and the runtime options. Pure."""
    from llmopt.exporters import openvino as exporter

    check(recipe)
    fp_plan = exporter.OpenVINOExporter().plan(fp_recipe(recipe))
    q = recipe.quantization
    group_size: int | str = q.group_size if q.group_size is not None else (
        "largest of 128, 64, 32, 16 dividing every layer's input size")
    compression = {"call": "nncf.compress_weights", **compression_arguments(recipe, group_size)}
    if needs_data(recipe):
        compression["calibration"] = {
            "dataset": q.dataset or DEFAULT_DATASET,
            "samples": q.num_samples,
            "each": f"prefill of up to {CALIBRATION_TOKENS} tokens, then {DECODE_STEPS} one-token decode steps",
        }
    runtime = dict(fp_plan["runtime"])
    runtime["ov_config"] = runtime_ov_config(recipe, runtime.get("ov_config") or {})
    return {**{key: value for key, value in fp_plan.items() if key != "runtime"}, "compress": compression,
            "runtime": runtime}


def fp_recipe(recipe: Recipe) -> Recipe:
    """The same recipe without quantization: what the exporter traces before compression."""
    return recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"weight_format": "none"})})


# -- building ---------------------------------------------------------------------------------


def build(recipe: Recipe, checkpoint: Path, workdir: Path) -> ExportResult:
    """Export the fp IR with the openvino exporter, then compress its weights in place."""
    from llmopt.exporters.openvino import OpenVINOExporter

    check(recipe)
    group_size = resolve_group_size(recipe, read_config(checkpoint))
    result = OpenVINOExporter().export(fp_recipe(recipe), checkpoint, workdir)
    tokenizer = load_tokenizer(checkpoint, recipe) if needs_data(recipe) else None
    details = compress_file(recipe, workdir / MODEL_FILE, workdir / MODEL_FILE, group_size, tokenizer)
    return quantized_result(recipe, result.io, result.runtime, details)


def requantize(source_artifact: Path, source_manifest, recipe: Recipe, workdir: Path) -> ExportResult:
    """Compress the weights of an fp openvino artifact into ``workdir``, keeping its shapes and files."""
    check(recipe)
    check_source(source_manifest, recipe)
    source_artifact = Path(source_artifact)
    model_file = source_manifest.runtime.get("model", MODEL_FILE)
    group_size = resolve_group_size(recipe, read_config(source_artifact))
    for path in source_artifact.iterdir():
        if path.name in ("llmopt.json", model_file, Path(model_file).with_suffix(".bin").name) or not path.is_file():
            continue
        shutil.copy2(path, workdir / path.name)
    tokenizer = load_tokenizer(source_artifact, recipe) if needs_data(recipe) else None
    details = compress_file(recipe, source_artifact / model_file, workdir / MODEL_FILE, group_size, tokenizer)
    return quantized_result(recipe, source_manifest.io, source_manifest.runtime, details)


def resolve_group_size(recipe: Recipe, config: dict[str, Any]) -> int | None:
    if recipe.quantization.weight_format != "int4":
        return None
    return choose_group_size(recipe.quantization.group_size, matmul_input_sizes(config))


def load_tokenizer(directory: Path, recipe: Recipe):
    transformers = require("transformers", extra="openvino")
    return transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=recipe.model.trust_remote_code)


def quantized_result(recipe: Recipe, io: dict[str, Any], fp_runtime: dict[str, Any], details: dict[str, Any]) -> ExportResult:
    runtime = dict(fp_runtime)
    runtime["ov_config"] = runtime_ov_config(recipe, fp_runtime.get("ov_config") or {})
    runtime["quantization"] = details
    return ExportResult(io=io, runtime=runtime)


def compress_file(recipe: Recipe, source: Path, destination: Path, group_size: int | None, tokenizer) -> dict[str, Any]:
    """Read the IR at ``source``, compress its weights, save it at ``destination`` (which may be ``source``)."""
    ov = require("openvino", extra="openvino")
    nncf = require("nncf", extra="openvino")
    model = ov.Core().read_model(source)
    pinned = {port.get_any_name(): port.get_partial_shape() for port in model.inputs}
    arguments = compression_arguments(recipe, group_size)
    described = ", ".join(f"{key}={value}" for key, value in arguments.items())
    events.info(f"compressing weights with NNCF ({described})")
    call = dict(arguments)
    call["mode"] = nncf.CompressWeightsMode(arguments["mode"])
    if "sensitivity_metric" in call:
        call["sensitivity_metric"] = nncf.SensitivityMetric(call["sensitivity_metric"])
    if "dataset" in call:
        model.reshape({name: batch_one(shape) for name, shape in pinned.items()})
        items = calibration_items(recipe, tokenizer, call["dataset"])
        call["dataset"] = nncf.Dataset(items)
        call["subset_size"] = len(items)
    from llmopt.exporters.openvino import backend_output_hidden

    with backend_output_hidden("nncf"):
        compressed = nncf.compress_weights(model, **call)
    if "dataset" in call:
        compressed.reshape(pinned)
    compressed.set_rt_info(kv_cache_precision(recipe), ["runtime_options", "KV_CACHE_PRECISION"])
    staged = destination.with_name(destination.stem + ".compressed.xml")
    ov.save_model(compressed, staged, compress_to_fp16=recipe.precision.dtype == "fp16")
    del model, compressed
    os.replace(staged.with_suffix(".bin"), destination.with_suffix(".bin"))
    os.replace(staged, destination)
    return {"backend": "nncf.compress_weights", **arguments, **weight_statistics(destination)}


def batch_one(shape):
    """The pinned input shape with batch 1, for calibration (statistics do not depend on the batch)."""
    dims = list(shape)
    dims[0] = 1
    return type(shape)(dims)


def calibration_items(recipe: Recipe, tokenizer, dataset: str) -> list[dict[str, Any]]:
    """Inputs of the stateful IR: per sample, a prefill (state reset) then DECODE_STEPS single tokens."""
    from nncf.definitions import NNCF_DATASET_RESET_STATE_KEY as RESET

    limit = min(CALIBRATION_TOKENS + DECODE_STEPS, recipe.shapes.sequence_length)
    samples = calibration.token_samples(dataset, recipe.quantization.num_samples, tokenizer, limit)
    items = []
    for ids in samples:
        prefill = ids[: max(1, len(ids) - DECODE_STEPS)]
        items.append({RESET: True, **stateful_inputs(prefill, 0)})
        for offset, token in enumerate(ids[len(prefill):]):
            items.append({RESET: False, **stateful_inputs([token], len(prefill) + offset)})
    return items


def stateful_inputs(ids: list[int], past: int) -> dict[str, np.ndarray]:
    length = len(ids)
    return {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, past + length), dtype=np.int64),
        "position_ids": np.arange(past, past + length, dtype=np.int64)[None],
        "beam_idx": np.zeros(1, dtype=np.int32),
    }


def weight_statistics(model_path: Path) -> dict[str, Any]:
    """How many weight constants ended up in each element type (read back from the saved IR)."""
    ov = require("openvino", extra="openvino")
    model = ov.Core().read_model(model_path)
    counts: dict[str, int] = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Constant" and node.get_output_size() == 1:
            element = node.get_output_element_type(0).get_type_name()
            if element in ("u4", "i4", "u8", "i8", "nf4"):
                shape = list(node.get_output_shape(0))
                if len(shape) >= 2 and int(np.prod(shape)) >= 1024:
                    counts[element] = counts.get(element, 0) + 1
    return {"weight_constants": counts}
