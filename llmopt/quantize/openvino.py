"""OpenVINO weight compression of the stateful IR: HQQ float zero points, or NNCF.

Two methods, both writing the weight format OpenVINO's CPU plugin fuses into FullyConnected
(a u4/u8/i8 constant, then Convert -> [Subtract zero point] -> Multiply scale):

* ``hqq`` (``llmopt.quantize.hqq``): data-free int4, asymmetric with float zero points, group
  size 32 by default. It is exact for a checkpoint de-quantized from GGUF Q4_1 (SmolLM2 here),
  where NNCF's integer zero points are not. The float zero point is written as the nearest u4
  zero point (the form the CPU plugin runs with int8 activations, its fast path) plus the exact
  remainder, added after each MatMul as the activations' group sums times the remainders.
  Embeddings and the last MatMul get int8 (symmetric, same groups, exact for Q8_0), or int4 with
  ``all_layers``.
* ``nncf`` (``nncf.compress_weights``): int8 per channel, or int4 with NNCF's options: ratio
  (the rest int8), AWQ, scale estimation, GPTQ, a sensitivity metric, symmetric weights. Its
  data-aware options run the fp IR on calibration text (``llmopt.quantize.calibration``): each
  sample is a prefill then a few one-token decode steps through the model's own state.

``algorithm: auto`` with int4 is hqq unless the recipe asks for an NNCF option (awq,
scale_estimation, a dataset, a sensitivity metric, ratio < 1, symmetric), then NNCF with AWQ and
scale estimation: plain int4 round-to-nearest with integer zero points turns a model as small as
SmolLM2-135M into a repetition loop, so it is never the default. The key/value cache precision
(``quantization.kv_cache``) and the recipe's ``openvino.ov_config`` go into the runtime options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from llmopt import events
from llmopt._deps import require
from llmopt.errors import RecipeError
from llmopt.quantize import calibration, check_format_and_shapes, choose_group_size, hqq, matmul_input_sizes, read_config
from llmopt.quantize.openvino_hqq import compress_hqq, fuse_parallel_linears
from llmopt.quantize.openvino_nncf import CALIBRATION_TOKENS, DECODE_STEPS, compress_nncf
from llmopt.recipe import Recipe

MODEL_FILE = "openvino_model.xml"
FORMATS = ("int8", "int4")
ALGORITHMS = ("auto", "hqq", "rtn", "awq", "gptq")
HQQ_GROUP_SIZES = (32, 16)  # Q4_1's block size first
# quantization.kv_cache -> KV_CACHE_PRECISION; "auto" is the CPU plugin's own default for quantized models.
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


# -- pure: check and plan ---------------------------------------------------------------------


def int4_ratio(q) -> float:
    """Share of the layers in int4 (NNCF's ``ratio``); unset means all of them."""
    return 1.0 if q.ratio is None else q.ratio


def mixed_precision(q) -> bool:
    """Whether some layers stay int8 (a ratio below 1)."""
    return int4_ratio(q) != 1.0


def method_of(recipe: Recipe) -> str:
    """``hqq`` or ``nncf`` for the recipe's quantization section."""
    q = recipe.quantization
    if q.weight_format != "int4" or q.algorithm in ("rtn", "awq", "gptq"):
        return "nncf"
    if q.algorithm == "hqq":
        return "hqq"
    explicit = q.model_fields_set
    asks_nncf = (
        ("awq" in explicit and q.awq) or ("scale_estimation" in explicit and q.scale_estimation)
        or q.dataset is not None or q.sensitivity_metric is not None or mixed_precision(q) or q.symmetric
    )
    return "nncf" if asks_nncf else "hqq"


def check(recipe: Recipe) -> None:
    """RecipeError for what the openvino target cannot build. Pure."""
    q = recipe.quantization
    if not q.enabled:
        return
    check_format_and_shapes(recipe, FORMATS, f" on {recipe.openvino.device}")
    if q.algorithm not in ALGORITHMS:
        raise RecipeError(f"quantization.algorithm '{q.algorithm}' is not supported by the openvino target; "
                          f"accepted: {', '.join(ALGORITHMS)}")
    if q.kv_cache not in KV_CACHE_PRECISIONS:
        raise RecipeError(f"quantization.kv_cache '{q.kv_cache}' is not supported by the openvino target on "
                          f"{recipe.openvino.device}; accepted: {', '.join(KV_CACHE_PRECISIONS)}")
    if q.sensitivity_metric is not None and q.sensitivity_metric not in SENSITIVITY_METRICS:
        raise RecipeError(f"quantization.sensitivity_metric '{q.sensitivity_metric}' is not an NNCF metric; "
                          f"accepted: {', '.join(SENSITIVITY_METRICS)}")
    calibration.check_name(q.dataset)
    if q.weight_format == "int8":
        _check_int8(recipe)
    elif method_of(recipe) == "hqq":
        _check_hqq(recipe)
    else:
        _check_nncf_int4(recipe)


def _first_given(options: dict[str, bool]) -> str | None:
    return next((name for name, used in options.items() if used), None)


def _check_int8(recipe: Recipe) -> None:
    q = recipe.quantization
    given = _first_given({
        "group_size": q.group_size not in (None, -1), "ratio": mixed_precision(q), "awq": q.awq,
        "scale_estimation": q.scale_estimation, "algorithm": q.algorithm not in ("auto", "rtn"),
        "sensitivity_metric": q.sensitivity_metric is not None, "all_layers": q.all_layers,
        "dataset": q.dataset is not None,
    })
    if given:
        raise RecipeError(f"quantization.{given} applies to int4 only: openvino int8 is per-channel round-to-nearest",
                          hint=f"set quantization.weight_format: int4, or remove quantization.{given}")


def _check_hqq(recipe: Recipe) -> None:
    q = recipe.quantization
    if recipe.precision.dtype == "bf16":
        raise RecipeError("quantization algorithm 'hqq' reads fp32 or fp16 weights; precision.dtype 'bf16' is not "
                          "supported with it; accepted: fp32, fp16", hint="or set quantization.algorithm: awq (NNCF)")
    given = _first_given({
        "symmetric": bool(q.symmetric), "ratio": mixed_precision(q), "awq": q.awq, "scale_estimation": q.scale_estimation,
        "dataset": q.dataset is not None, "sensitivity_metric": q.sensitivity_metric is not None,
    })
    if given:
        raise RecipeError(f"quantization.{given} does not apply to algorithm 'hqq' (data-free, asymmetric, float zero points)",
                          hint="use algorithm awq or rtn for NNCF's options")


def _check_nncf_int4(recipe: Recipe) -> None:
    q = recipe.quantization
    if q.algorithm == "rtn" and (q.awq or q.scale_estimation):
        flag = "awq" if q.awq else "scale_estimation"
        raise RecipeError(f"quantization.{flag} contradicts quantization.algorithm 'rtn' (data-free round-to-nearest)",
                          hint=f"set quantization.algorithm: auto, or remove quantization.{flag}")
    if q.sensitivity_metric is not None and not mixed_precision(q):
        raise RecipeError("quantization.sensitivity_metric ranks layers for mixed precision: it needs quantization.ratio < 1",
                          hint="e.g. quantization.ratio: 0.8 (80% of layers in int4, the rest int8)")


def compression_arguments(recipe: Recipe, group_size: int | str = "<chosen at export>") -> dict[str, Any]:
    """What the compression does, as JSON-able data (for NNCF, its ``compress_weights`` arguments). Pure."""
    q = recipe.quantization
    if method_of(recipe) == "hqq":
        return {"method": "hqq", "mode": "int4_asym",
                "zero_point": "float, as the nearest u4 zero point plus the remainder (group sums x remainders)",
                "group_size": group_size,
                "embeddings_and_last_matmul": "int4" if q.all_layers else "int8_sym", "max_iterations": hqq.ITERATIONS}
    symmetric = bool(q.symmetric)
    arguments: dict[str, Any] = {"method": "nncf", "mode": f"{q.weight_format}_{'sym' if symmetric else 'asym'}"}
    if q.weight_format == "int8":
        return arguments
    awq, scale_estimation, gptq = nncf_algorithms(recipe)
    arguments.update(group_size=group_size, ratio=int4_ratio(q), all_layers=q.all_layers,
                     awq=awq, scale_estimation=scale_estimation, gptq=gptq)
    if q.sensitivity_metric is not None:
        arguments["sensitivity_metric"] = q.sensitivity_metric
    if needs_data(recipe):
        arguments["dataset"] = q.dataset or DEFAULT_DATASET
    return arguments


def nncf_algorithms(recipe: Recipe) -> tuple[bool, bool, bool]:
    """(awq, scale_estimation, gptq) for an NNCF int4 recipe: AWQ and scale estimation unless turned off."""
    q = recipe.quantization
    explicit = q.model_fields_set
    if q.algorithm == "rtn":
        return False, False, False
    if q.algorithm == "gptq":
        return bool(q.awq), bool(q.scale_estimation), True
    awq = q.awq if "awq" in explicit else True
    scale_estimation = q.scale_estimation if "scale_estimation" in explicit else True
    return awq, scale_estimation, False


def needs_data(recipe: Recipe) -> bool:
    q = recipe.quantization
    if q.weight_format != "int4" or method_of(recipe) != "nncf":
        return False
    awq, scale_estimation, gptq = nncf_algorithms(recipe)
    metric_needs_data = q.sensitivity_metric is not None and q.sensitivity_metric not in DATA_FREE_METRICS
    return awq or scale_estimation or gptq or metric_needs_data or q.dataset is not None


def kv_cache_precision(recipe: Recipe) -> str:
    return KV_CACHE_PRECISIONS[recipe.quantization.kv_cache]


def runtime_ov_config(recipe: Recipe, base: dict[str, Any]) -> dict[str, Any]:
    """The artifact's ov_config: the fp export's, the cache precision, then the recipe's own settings.

    int8 weights with precision fp32 keep f32 activations: the CPU plugin's dynamic quantization
    (int8 activations in groups of 32) costs SmolLM2 top-1 agreement 0.92 -> 0.90 there. int4
    keeps it: it is what makes integer-zero-point int4 fast, so HQQ's float zero points are written
    as the nearest u4 zero point plus an exact remainder (``openvino_hqq.compress_hqq``): SmolLM2
    top-1 0.969 -> 0.948, TTFT 198 -> 101 ms and decode 68 -> 74.5 tokens/s in one bench run.
    """
    ov_config = {**base, "KV_CACHE_PRECISION": kv_cache_precision(recipe)}
    if recipe.quantization.weight_format == "int8" and recipe.precision.dtype == "fp32":
        ov_config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    ov_config.update(recipe.openvino.ov_config)
    return ov_config


def fuses_linears(recipe: Recipe) -> bool:
    """Whether the linears that read one activation become one MatMul before compression: where the
    compression is data-free and row by row (HQQ's int4 groups, int8 per output channel), so every
    row is quantized as it would be alone. SmolLM2 int4 HQQ decodes 1.23x faster, int8 about 1.15x (README)."""
    return method_of(recipe) == "hqq" or recipe.quantization.weight_format == "int8"


def plan(recipe: Recipe, runtime: dict[str, Any]) -> dict[str, Any]:
    """The weight compression after the fp export, and the runtime options it leaves. Pure."""
    check(recipe)
    q = recipe.quantization
    candidates = HQQ_GROUP_SIZES if method_of(recipe) == "hqq" else (128, 64, 32, 16)
    group_size: int | str = q.group_size if q.group_size is not None else (
        f"largest of {', '.join(map(str, candidates))} dividing every layer's input size")
    compression = {"call": "nncf.compress_weights" if method_of(recipe) == "nncf" else "llmopt.quantize.hqq",
                   **compression_arguments(recipe, group_size)}
    if fuses_linears(recipe):
        compression["merge"] = "the MatMuls that read one activation (q/k/v, gate/up) become one, then a VariadicSplit"
    if needs_data(recipe):
        compression["calibration"] = {
            "dataset": q.dataset or DEFAULT_DATASET, "samples": q.num_samples,
            "each": f"prefill of up to {CALIBRATION_TOKENS} tokens, then {DECODE_STEPS} one-token decode steps",
        }
    return {"compress": compression, "runtime": quantized_runtime(recipe, runtime)}


# -- the pass ---------------------------------------------------------------------------------


def quantize(recipe: Recipe, body: Path, runtime: dict[str, Any]) -> dict[str, Any]:
    """Compress the weights of the IR in the artifact body ``body`` in place."""
    check(recipe)
    group_size = group_sizes(recipe, read_config(body))
    tokenizer = load_tokenizer(body, recipe) if needs_data(recipe) else None
    model_file = body / runtime.get("model", MODEL_FILE)
    details = compress_file(recipe, model_file, model_file, group_size, tokenizer)
    return {**quantized_runtime(recipe, runtime), "quantization": details}


def quantized_runtime(recipe: Recipe, runtime: dict[str, Any]) -> dict[str, Any]:
    """The fp artifact's runtime options with the quantized model's ov_config."""
    return {**runtime, "ov_config": runtime_ov_config(recipe, runtime.get("ov_config") or {})}


def group_sizes(recipe: Recipe, config: dict[str, Any]) -> int | None:
    if recipe.quantization.weight_format != "int4":
        return None
    sizes = matmul_input_sizes(config)
    if method_of(recipe) == "hqq":
        return choose_group_size(recipe.quantization.group_size, sizes, HQQ_GROUP_SIZES)
    return choose_group_size(recipe.quantization.group_size, sizes)


def load_tokenizer(directory: Path, recipe: Recipe):
    transformers = require("transformers", extra="openvino")
    return transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=recipe.model.trust_remote_code)


def compress_file(recipe: Recipe, source: Path, destination: Path, group_size: int | None, tokenizer) -> dict[str, Any]:
    """Read the IR at ``source``, compress its weights, save it at ``destination`` (which may be ``source``)."""
    ov = require("openvino", extra="openvino")
    model = ov.Core().read_model(source)
    arguments = compression_arguments(recipe, group_size)
    events.info("compressing weights (" + ", ".join(f"{key}={value}" for key, value in arguments.items()) + ")")
    merged = fuse_parallel_linears(model) if fuses_linears(recipe) else 0
    if merged:
        events.info(f"{merged} MatMuls merged into others that read the same activation")
    if arguments["method"] == "hqq":
        compress_hqq(model, group_size, recipe.quantization.all_layers, integer_zero_points=True)
    else:
        model = compress_nncf(model, recipe, arguments, tokenizer)
    model.set_rt_info(kv_cache_precision(recipe), ["runtime_options", "KV_CACHE_PRECISION"])
    staged = destination.with_name(destination.stem + ".compressed.xml")
    ov.save_model(model, staged, compress_to_fp16=recipe.precision.dtype == "fp16")
    del model
    os.replace(staged.with_suffix(".bin"), destination.with_suffix(".bin"))
    os.replace(staged, destination)
    return {**arguments, "merged_matmuls": merged, "weights": weight_statistics(destination)}


def weight_statistics(model_path: Path) -> dict[str, int]:
    """Weight constants of the saved IR by element type (u4, i8, ...) and their parameter counts."""
    ov = require("openvino", extra="openvino")
    model = ov.Core().read_model(model_path)
    counts: dict[str, int] = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or node.get_output_size() != 1:
            continue
        shape = list(node.get_output_shape(0))
        size = int(np.prod(shape)) if shape else 1
        if len(shape) >= 2 and shape[-1] > 1 and size >= 1024:  # weights, not scales or zero points
            element = node.get_output_element_type(0).get_type_name()
            counts[f"{element}_tensors"] = counts.get(f"{element}_tensors", 0) + 1
            counts[f"{element}_parameters"] = counts.get(f"{element}_parameters", 0) + size
    return counts
