"""ONNX weight quantization: blockwise MatMulNBits written into onnxruntime-genai's builder graph.

The onnx exporter writes the fp32 graph (onnxruntime-genai's model builder: fused
GroupQueryAttention, packed QKV); this module then replaces every MatMul with a constant weight
by a ``com.microsoft.MatMulNBits`` node (blocks of input channels, one float scale and an integer
zero point per block), and the embedding's ``Gather`` (``Gather(Transpose(lm_head))`` when tied)
by a ``GatherBlockQuantized`` that reads the lm_head's blocks. The graph's inputs, outputs and
``genai_config.json`` stay as the exporter wrote them, so the artifact loads in plain
onnxruntime-genai like the fp one.

Why this and not onnxruntime's own quantizers, measured on SmolLM2-135M-Instruct (teacher-forced
against PyTorch fp32 on 192 tokens of ``llmopt/data/validation.txt``):

* onnxruntime's ``MatMulNBitsQuantizer`` (``DefaultWeightOnlyQuantConfig``, asymmetric, uint8
  zero points, accuracy_level 4) does the per-MatMul RTN part, but it cannot quantize the tied
  embedding (the builder's ``Gather(Transpose(lm_head))`` reads no initializer, and its Gather
  path is 4-bit only), so the 113 MB fp32 table stays: 8-bit in blocks of 32 gives 276 MB at
  top-1 0.938 / KL 0.0046, this module 162 MB at 0.922 / 0.0044; int4 in blocks of 16 gives
  226 MB at 0.714 / KL 0.262, this module's GPTQ 4/8-bit mix 138 MB at 0.870 / 0.034. Its
  8-bit blocks match ``blocks.quantize_rtn`` on 99.92% of an o_proj's weights (the scales are
  equal, the rest round the other way), so swapping it in would change every shipped int8 byte.
  Its GPTQ needs Intel's neural-compressor, and it has no per-node 4/8-bit plan of its own.
* The model builder's own int4 (``precision int4``) rounds every MatMul to nearest: top-1
  0.61-0.70, with repetitive answers.

What moves the accuracy here:

* Integer zero points only. onnxruntime's CPU MatMulNBits prepacks its weights for the fast
  kernels only when the zero points are uint8; float zero points (HQQ) fall back to
  de-quantizing the whole weight on every call (contrib_ops/cpu/quantization/matmul_nbits.cc).
  Its only fast 8-bit kernel quantizes the activations to int8 (accuracy_level 4), so every
  node here uses that level.
* The lm_head and the embedding tied to it: 8-bit symmetric blocks of 32, shared. A checkpoint
  de-quantized from a GGUF Q8_0 tensor comes back exactly (scale = absmax / 127).
* int4 where it is cheap in accuracy: the packed QKV (v_proj alone costs most of the int4 error)
  and the down projections stay 8-bit by default; ``quantization.ratio`` set explicitly picks
  the int4 share instead. The int4 blocks (16 input channels) are GPTQ, calibrated on
  ``quantization.dataset`` through the fp32 graph itself, unless ``algorithm: rtn``.

A checkpoint de-quantized from GGUF Q4_1 (``w = d * q + m`` per block of 32) is not exact with
integer zero points: ``-m / d`` is not an integer, so every block keeps an offset of up to d/2,
which round-to-nearest cannot remove and GPTQ spreads onto the other columns. ``algorithm: hqq``
keeps HQQ's float zero points without the slow path: each block runs as the nearest integer zero
point on the fast kernels, plus the remainder (at most half a step) as a small fp32 MatMul of the
activations' block sums (``onnx_graph.offset_correction``). On SmolLM2 (a Q4_1 GGUF) every weight
comes back exactly: top-1 1.000 with fp32 activations, 0.927 / KL 0.0031 with the int8 activations
of the fast kernels (token by token, as generation decodes; 0.911 through the prefill path), all
decoder MatMuls int4 (115 MB), decoding as fast as the GPTQ mix.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from llmopt import events
from llmopt._deps import require
from llmopt.errors import RecipeError
from llmopt.quantize import check_format_and_shapes, dividing_group_sizes, matmul_input_sizes, read_config
from llmopt.quantize import hqq
from llmopt.quantize.blocks import Blocks, quantize_gptq, quantize_rtn, quantize_symmetric
from llmopt.quantize.moments import CALIBRATION_TOKENS, input_moments
from llmopt.quantize.onnx_graph import ACCURACY_LEVEL, MODEL_FILE, Target, find_targets, initializer_array, rewrite, save
from llmopt.recipe import Recipe

FORMATS = ("int8", "int4")
ALGORITHMS = ("auto", "rtn", "gptq", "hqq")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
# Default blocks: int4 weights in blocks of 16 (more accurate than 32 at +1.1 bits a weight);
# 8-bit weights in blocks of 32, GGUF Q8_0's own block (its scales come back exactly).
DEFAULT_BLOCK_SIZES = {4: 16, 8: 32}
HQQ_BLOCK_SIZE = 32  # GGUF Q4_0/Q4_1's block: a checkpoint de-quantized from one comes back exactly
# Roles of the builder's MatMuls (``/model/layers.<i>/<attn|mlp>/<role>/MatMul``), most sensitive first.
ROLES = ("qkv_proj", "down_proj", "up_proj", "gate_proj", "o_proj")
INT8_ROLES = ("qkv_proj", "down_proj")  # kept 8-bit in int4 artifacts unless quantization.ratio is set


# -- pure: check and plan ---------------------------------------------------------------------


def check(recipe: Recipe) -> None:
    """RecipeError for what onnxruntime's MatMulNBits cannot build or run here. Pure."""
    q = recipe.quantization
    if not q.enabled:
        return
    check_format_and_shapes(recipe, FORMATS, f": onnxruntime's CPU provider has no {q.weight_format} MatMul")
    if recipe.onnx.provider != "cpu":
        raise RecipeError(
            f"quantization with onnx.provider '{recipe.onnx.provider}' is not supported by llmopt yet; accepted: cpu",
            hint="set onnx.provider: cpu, or quantization.weight_format: none",
        )
    if recipe.precision.dtype != "fp32":
        raise RecipeError(
            f"precision.dtype '{recipe.precision.dtype}' with quantization: the onnx target quantizes the fp32 CPU "
            "graph; accepted: fp32",
            hint="set precision.dtype: fp32 (the activations of MatMulNBits on CPU are fp32 anyway)",
        )
    if q.algorithm == "hqq" and (q.weight_format != "int4" or q.symmetric or q.all_layers):
        what = ("quantization.weight_format int4" if q.weight_format != "int4" else
                "asymmetric blocks (quantization.symmetric false)" if q.symmetric else
                "an 8-bit lm_head (quantization.all_layers false: the embedding shares its blocks)")
        raise RecipeError(f"quantization.algorithm hqq (float zero points) on the onnx target needs {what}")
    if q.algorithm not in ALGORITHMS:
        why = {"awq": "onnxruntime's AWQ needs NVIDIA's modelopt on a GPU"}[q.algorithm]
        raise RecipeError(f"quantization.algorithm '{q.algorithm}' is not supported by the onnx target: {why}; "
                          f"accepted: {', '.join(ALGORITHMS)}",
                          hint="algorithm gptq is the calibrated one; the openvino target has hqq and awq")
    for flag in ("awq", "scale_estimation"):
        if getattr(q, flag):
            raise RecipeError(f"quantization.{flag} is an NNCF option (openvino target); the onnx target does not "
                              "have it", hint=f"remove quantization.{flag}, or use algorithm: gptq")
    if q.sensitivity_metric is not None:
        raise RecipeError("quantization.sensitivity_metric is an NNCF option (openvino target); the onnx target "
                          f"ranks layers by role ({', '.join(ROLES)})", hint="remove quantization.sensitivity_metric")
    if q.kv_cache not in ("auto", "fp32"):
        raise RecipeError(f"quantization.kv_cache '{q.kv_cache}': onnxruntime-genai's GroupQueryAttention cache "
                          "has the graph's precision (fp32); accepted: auto, fp32")
    if q.group_size is not None and q.group_size not in BLOCK_SIZES:
        what = "one group per output channel" if q.group_size == -1 else "not a power of two of at least 16"
        raise RecipeError(f"quantization.group_size {q.group_size} ({what}) cannot be a MatMulNBits block size; "
                          f"accepted: {', '.join(map(str, BLOCK_SIZES))} (dividing the model's layer sizes)")
    if q.weight_format == "int8":
        given = "ratio" if q.ratio not in (None, 1.0) else "all_layers" if q.all_layers else None
        if given:
            raise RecipeError(f"quantization.{given} applies to int4 only: every MatMul of an onnx int8 artifact "
                              "is 8-bit", hint=f"set quantization.weight_format: int4, or remove quantization.{given}")


def settings(recipe: Recipe, block_sizes: dict[int, int] | None = None) -> dict[str, Any]:
    """What the quantization does, as JSON-able data. Pure."""
    q = recipe.quantization
    int4 = q.weight_format == "int4"
    algorithm = resolved_algorithm(recipe)
    result: dict[str, Any] = {
        "op": "com.microsoft.MatMulNBits",
        "weight_format": q.weight_format,
        "block_size": {f"int{bits}": size for bits, size in (block_sizes or requested_block_sizes(recipe)).items()},
        "symmetric": bool(q.symmetric),
        "zero_points": ("float, run as the nearest uint8 zero point plus the activations' block sums times the "
                        "remainders"
                        if algorithm == "hqq" else "none (symmetric: 8 or 128)" if q.symmetric else "uint8 (integer)"),
        "accuracy_level": ACCURACY_LEVEL,
        "algorithm": algorithm,
        "lm_head_and_embeddings": ("int4, shared (GatherBlockQuantized)" if int4 and q.all_layers
                                   else "int8 symmetric, shared (GatherBlockQuantized)"),
    }
    if int4:
        result["int8_roles"] = ("chosen by quantization.ratio" if ratio_given(recipe) else
                                [] if algorithm == "hqq" else list(INT8_ROLES))
        result["ratio"] = q.ratio if ratio_given(recipe) else None
    if algorithm == "gptq":
        result["calibration"] = {"dataset": q.dataset or "default", "samples": q.num_samples,
                                 "tokens_per_sample": f"at most {CALIBRATION_TOKENS}"}
    return result


def ratio_given(recipe: Recipe) -> bool:
    """Whether the recipe sets quantization.ratio itself; unset, int4 keeps INT8_ROLES in 8-bit."""
    return recipe.quantization.ratio is not None


def requested_block_sizes(recipe: Recipe) -> dict[int, int]:
    """Block size per bit width: quantization.group_size for the artifact's own format, else the defaults.

    The 8-bit blocks of an int4 artifact (its int8 roles, lm_head, embeddings) keep 32. Pure.
    """
    q = recipe.quantization
    main = 4 if q.weight_format == "int4" else 8
    sizes = dict(DEFAULT_BLOCK_SIZES) if main == 4 else {8: DEFAULT_BLOCK_SIZES[8]}
    if q.algorithm == "hqq":
        sizes[4] = HQQ_BLOCK_SIZE
    if q.group_size is not None:
        sizes[main] = q.group_size
    return sizes


def resolved_algorithm(recipe: Recipe) -> str:
    """gptq or rtn: int4 calibrates by default, int8 blocks are near-exact without it."""
    q = recipe.quantization
    if q.algorithm != "auto":
        return q.algorithm
    return "gptq" if q.weight_format == "int4" else "rtn"


def plan(recipe: Recipe, runtime: dict[str, Any]) -> dict[str, Any]:
    """The MatMulNBits rewrite after the fp export; the runtime options stay the fp artifact's. Pure."""
    check(recipe)
    return {"quantize": {"call": "llmopt.quantize.onnx", **settings(recipe)}, "runtime": runtime}


# -- the pass ---------------------------------------------------------------------------------


def quantize(recipe: Recipe, body: Path, runtime: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the fp32 graph of the artifact body in ``body`` with MatMulNBits weights, in place."""
    check(recipe)
    block_sizes = group_sizes(recipe, read_config(body))
    details = quantize_model(recipe, body, body, block_sizes)
    return {**runtime, "quantization": details}


def group_sizes(recipe: Recipe, config: dict[str, Any]) -> dict[int, int]:
    """The block sizes, checked against every layer's input size: a group_size that does not divide
    them is an error listing those that do; a default that does not falls back to one that does."""
    sizes = matmul_input_sizes(config)
    working = dividing_group_sizes(sizes, BLOCK_SIZES)
    described = ", ".join(f"{name} {value}" for name, value in sizes.items())
    q = recipe.quantization
    main = 4 if q.weight_format == "int4" else 8
    resolved = {}
    for bits, size in requested_block_sizes(recipe).items():
        if all(value % size == 0 for value in sizes.values()):
            resolved[bits] = size
        elif bits == main and q.group_size is not None:
            raise RecipeError(
                f"quantization.group_size {size} does not divide the model's layer sizes ({described}); "
                f"accepted: {', '.join(map(str, working)) or 'none'}",
                hint="set quantization.group_size to one of those, or leave it unset",
            )
        elif working:
            resolved[bits] = min(working, key=lambda candidate: abs(candidate - size))
        else:
            raise RecipeError(f"no MatMulNBits block size ({', '.join(map(str, BLOCK_SIZES))}) divides the model's "
                              f"layer sizes ({described})", hint="this model cannot be quantized by the onnx target")
    return resolved


# -- the rewrite: bits per MatMul, blocks, graph ------------------------------------------


def quantize_model(recipe: Recipe, source_dir: Path, destination_dir: Path, block_sizes: dict[int, int]) -> dict[str, Any]:
    """Rewrite ``source_dir/model.onnx`` into ``destination_dir`` (which may be the same directory)."""
    onnx = require("onnx", extra="onnx")
    started = time.perf_counter()
    model = onnx.load(str(Path(source_dir) / MODEL_FILE))  # the weights too: the rewrite needs them
    targets = find_targets(model)
    if any(node.op_type in ("MatMulNBits", "GatherBlockQuantized") for node in model.graph.node):
        raise RecipeError("the source graph already has quantized MatMulNBits weights; quantizing it again would "
                          "compound the error", hint="quantize its fp artifact, or the checkpoint with -m")
    if not targets:
        raise RecipeError(f"{Path(source_dir) / MODEL_FILE} has no MatMul with a constant weight to quantize")
    bits = choose_bits(recipe, targets)
    algorithm = resolved_algorithm(recipe)
    symmetric = bool(recipe.quantization.symmetric)
    moments = None
    calibrated = [t for t in targets if algorithm == "gptq" and bits[t.node.name] == 4 and t.role != "lm_head"]
    if calibrated:
        moments = input_moments(model, calibrated, recipe, Path(source_dir))
    events.info(f"quantizing {len(targets)} MatMuls to MatMulNBits ({recipe.quantization.weight_format}, "
                f"{algorithm}, blocks of {block_sizes})")
    torch = require("torch", extra="onnx")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # GPTQ's column loop is many small ops: one thread is the fastest here
    try:
        blocks = {}
        for target in targets:
            weight = initializer_array(model, target.weight).T  # [N, K]
            target_bits = bits[target.node.name]
            block_size = block_sizes.get(target_bits) or block_sizes[4]
            if target.role == "lm_head" and target_bits == 8:
                blocks[target.node.name] = quantize_symmetric(weight, 8, block_size)
            elif target_bits == 4 and algorithm == "hqq":
                blocks[target.node.name] = float_zero_point_blocks(weight, block_size)
            elif target_bits == 4 and moments is not None and target.node.input[0] in moments:
                blocks[target.node.name] = quantize_gptq(weight, moments[target.node.input[0]], 4, block_size, symmetric)
            else:
                blocks[target.node.name] = quantize_rtn(weight, target_bits, block_size, symmetric)
    finally:
        torch.set_num_threads(threads)
    rewrite(model, targets, blocks, DEFAULT_BLOCK_SIZES[8])
    save(model, Path(destination_dir))
    counts: dict[str, int] = {}
    for target in targets:
        key = f"int{bits[target.node.name]}_parameters"
        counts[key] = counts.get(key, 0) + int(np.prod(blocks[target.node.name].q.shape))
    return {**settings(recipe, block_sizes), "weights": counts, "seconds": round(time.perf_counter() - started, 1)}


def choose_bits(recipe: Recipe, targets: list[Target]) -> dict[str, int]:
    """Bits per MatMul: int8 artifacts all 8; int4 artifacts 4 except the int8 roles and the lm_head."""
    q = recipe.quantization
    if q.weight_format == "int8":
        return {t.node.name: 8 for t in targets}
    bits = {t.node.name: 4 for t in targets}
    for t in targets:
        if t.role == "lm_head" and not q.all_layers:
            bits[t.node.name] = 8
    decoder = [t for t in targets if t.role != "lm_head"]
    if ratio_given(recipe):
        sizes = {t.node.name: t.shape[0] * t.shape[1] for t in decoder}
        total = sum(sizes.values())
        int4_share = 1.0
        # Most sensitive role first, and within a role the outermost layers first.
        depth = max((t.layer or 0) for t in decoder) if decoder else 0
        order = sorted(decoder, key=lambda t: (ROLES.index(t.role) if t.role in ROLES else len(ROLES),
                                               min(t.layer or 0, depth - (t.layer or 0))))
        for t in order:
            if int4_share <= q.ratio + 1e-9:
                break
            bits[t.node.name] = 8
            int4_share -= sizes[t.node.name] / total
    elif resolved_algorithm(recipe) != "hqq":  # float zero points lose too little to need 8-bit roles
        for t in decoder:
            if t.role in INT8_ROLES:
                bits[t.node.name] = 8
    return bits


def float_zero_point_blocks(weight: np.ndarray, block_size: int) -> Blocks:
    """HQQ's asymmetric int4 blocks (float zero point z) as integer blocks with the nearest integer zero
    point plus a float offset per block: ``(q - z) * s = (q - round(z)) * s + (round(z) - z) * s``.

    The integer part runs on the fast kernels like any asymmetric block; the offset (at most half a
    step) is the exact remainder. A zero point of 0 with the whole ``-z * s`` as offset is exact too,
    but onnxruntime's int8 activations then err on all-positive weights: top-1 0.745 on SmolLM2.
    """
    quantized = hqq.quantize_asym(weight, block_size)
    integer, remainder = quantized.split_zero_point()
    return Blocks(bits=4, q=quantized.q.reshape(weight.shape[0], -1), scale=quantized.scale[..., 0].astype(np.float32),
                  zero=integer, offset=remainder)
