"""ONNX weight quantization: blockwise MatMulNBits written into onnxruntime-genai's builder graph.

The onnx exporter writes the fp32 graph (onnxruntime-genai's model builder: fused
GroupQueryAttention, packed QKV); this module then replaces every MatMul with a constant weight
by a ``com.microsoft.MatMulNBits`` node (blocks of input channels, one float scale and an integer
zero point per block), and the embedding's ``Gather`` (``Gather(Transpose(lm_head))`` when tied)
by a ``GatherBlockQuantized`` that reads the lm_head's blocks. The graph's inputs, outputs and
``genai_config.json`` stay as the exporter wrote them, so the artifact loads in plain
onnxruntime-genai like the fp one.

Why this and not the model builder's own int4 (``precision int4``), measured on SmolLM2-135M
(``.notes/onnx_quant_variants.md``): the builder rounds every MatMul to nearest and reaches
0.61-0.70 teacher-forced top-1 agreement with PyTorch, with repetitive answers; the default
here reaches 0.87. What moves it:

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
which round-to-nearest cannot remove and GPTQ spreads onto the other columns.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmopt import events
from llmopt._deps import require
from llmopt.errors import RecipeError
from llmopt.quantize import calibration, check_format_and_shapes, dividing_group_sizes, matmul_input_sizes, read_config
from llmopt.recipe import Recipe

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
FORMATS = ("int8", "int4")
ALGORITHMS = ("auto", "rtn", "gptq")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
# Default blocks: int4 weights in blocks of 16 (more accurate than 32 at +1.1 bits a weight);
# 8-bit weights in blocks of 32, GGUF Q8_0's own block (its scales come back exactly).
DEFAULT_BLOCK_SIZES = {4: 16, 8: 32}
# Roles of the builder's MatMuls (``/model/layers.<i>/<attn|mlp>/<role>/MatMul``), most sensitive first.
ROLES = ("qkv_proj", "down_proj", "up_proj", "gate_proj", "o_proj")
INT8_ROLES = ("qkv_proj", "down_proj")  # kept 8-bit in int4 artifacts unless quantization.ratio is set
LM_HEAD = "/lm_head/MatMul"
# 4: int8 activations (per block) and the int8 dot-product kernels, the only fast 8-bit kernel on CPU.
# 1 (fp32 activations) has a fast 4-bit kernel but no 8-bit one, and did not help the int4 nodes.
ACCURACY_LEVEL = 4
CALIBRATION_TOKENS = 256
GPTQ_DAMPING = 0.01
GPTQ_COLUMNS = 128  # columns updated together (GPTQ's lazy batch)
PROTOBUF_LIMIT = 2**31 - 2**26  # a serialized ModelProto must stay under 2 GiB
EXTERNAL_DATA_THRESHOLD = 1024  # smaller tensors (shapes) stay inside model.onnx for shape inference


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
    if q.algorithm not in ALGORITHMS:
        why = {
            "hqq": "HQQ writes float zero points, which onnxruntime's MatMulNBits runs on its slow path "
                   "(the weight de-quantized on every call)",
            "awq": "onnxruntime's AWQ needs NVIDIA's modelopt on a GPU",
        }[q.algorithm]
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
        "zero_points": "none (symmetric: 8 or 128)" if q.symmetric else "uint8 (integer)",
        "accuracy_level": ACCURACY_LEVEL,
        "algorithm": algorithm,
        "lm_head_and_embeddings": ("int4, shared (GatherBlockQuantized)" if int4 and q.all_layers
                                   else "int8 symmetric, shared (GatherBlockQuantized)"),
    }
    if int4:
        result["int8_roles"] = "chosen by quantization.ratio" if ratio_given(recipe) else list(INT8_ROLES)
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


# -- the graph rewrite ------------------------------------------------------------------------


@dataclass
class Target:
    node: Any  # the MatMul NodeProto
    weight: str  # its constant input [K, N]
    role: str  # qkv_proj, o_proj, ..., lm_head
    layer: int | None
    shape: tuple[int, int]  # the weight's [K, N]


@dataclass
class Blocks:
    """One weight in MatMulNBits form: ``w[n, k] = (q[n, k] - zero[n, k // block]) * scale[n, k // block]``."""

    bits: int
    q: np.ndarray  # uint8 [N, K], 0 .. 2**bits - 1
    scale: np.ndarray  # float32 [N, K // block]
    zero: np.ndarray | None  # uint8 [N, K // block]; None: the op's default 2**(bits - 1)

    @property
    def block_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]


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
            elif target_bits == 4 and moments is not None and target.node.input[0] in moments:
                blocks[target.node.name] = quantize_gptq(weight, moments[target.node.input[0]], 4, block_size, symmetric)
            else:
                blocks[target.node.name] = quantize_rtn(weight, target_bits, block_size, symmetric)
    finally:
        torch.set_num_threads(threads)
    rewrite(model, targets, blocks)
    save(model, Path(destination_dir))
    counts: dict[str, int] = {}
    for target in targets:
        key = f"int{bits[target.node.name]}_parameters"
        counts[key] = counts.get(key, 0) + int(np.prod(blocks[target.node.name].q.shape))
    return {**settings(recipe, block_sizes), "weights": counts, "seconds": round(time.perf_counter() - started, 1)}


def find_targets(model) -> list[Target]:
    """MatMuls whose second input is a 2-D float initializer, with their role in the builder's naming."""
    onnx = require("onnx", extra="onnx")
    weights = {init.name: init for init in model.graph.initializer
               if len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT}
    outputs = {value.name for value in model.graph.output}
    targets = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in weights:
            continue
        parts = node.name.strip("/").split("/")
        layer = next((int(part.split(".")[1]) for part in parts if part.startswith("layers.")), None)
        if node.name == LM_HEAD or node.output[0] in outputs:
            role = "lm_head"
        else:
            role = parts[-2] if len(parts) >= 2 else node.name
        shape = (int(weights[node.input[1]].dims[0]), int(weights[node.input[1]].dims[1]))
        targets.append(Target(node=node, weight=node.input[1], role=role, layer=layer, shape=shape))
    return targets


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
    else:
        for t in decoder:
            if t.role in INT8_ROLES:
                bits[t.node.name] = 8
    return bits


def initializer_array(model, name: str) -> np.ndarray:
    onnx = require("onnx", extra="onnx")
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init).astype(np.float64)
    raise KeyError(name)


def rewrite(model, targets: list[Target], blocks: dict[str, Blocks]) -> None:
    """MatMul -> MatMulNBits; the tied embedding's Transpose -> Gather -> GatherBlockQuantized on the lm_head blocks."""
    onnx = require("onnx", extra="onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = model.graph
    replaced = {t.node.name: t for t in targets}
    new_initializers = []
    lm_head_inputs: dict[str, list[str]] = {}
    nodes = []
    for node in graph.node:
        target = replaced.get(node.name) if node.op_type == "MatMul" else None
        if target is None:
            nodes.append(node)
            continue
        quantized = blocks[node.name]
        n_out, k_in = quantized.q.shape
        block_size = quantized.block_size
        names = [f"{target.weight}_Q{quantized.bits}G{block_size}", f"{target.weight}_scale"]
        data = pack(quantized.q, quantized.bits).reshape(n_out, k_in // block_size, block_size * quantized.bits // 8)
        new_initializers += [numpy_helper.from_array(data, names[0]),
                             numpy_helper.from_array(quantized.scale.astype(np.float32), names[1])]
        if quantized.zero is not None:
            names.append(f"{target.weight}_zero_point")
            new_initializers.append(numpy_helper.from_array(pack(quantized.zero, quantized.bits), names[2]))
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *names], list(node.output), name=f"{node.name}_Q{quantized.bits}",
            domain="com.microsoft", K=k_in, N=n_out, bits=quantized.bits, block_size=block_size,
            accuracy_level=ACCURACY_LEVEL,
        ))
        if target.role == "lm_head":
            lm_head_inputs[target.weight] = names
    nodes = share_embedding(model, nodes, lm_head_inputs, blocks, targets, new_initializers)
    used = {name for node in nodes for name in node.input} | {value.name for value in graph.output}
    kept = [init for init in graph.initializer if init.name in used]  # the float weights are read no more
    graph.ClearField("initializer")
    graph.initializer.extend(kept + new_initializers)
    graph.ClearField("node")
    graph.node.extend(nodes)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def share_embedding(model, nodes, lm_head_inputs, blocks, targets, new_initializers):
    """The embedding Gather reads quantized blocks: the lm_head's when tied (the builder's
    ``Gather(Transpose(lm_head weight))``), else its own table's, quantized like the lm_head."""
    onnx = require("onnx", extra="onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    transposes = {node.output[0]: node for node in nodes
                  if node.op_type == "Transpose" and node.input[0] in lm_head_inputs}
    lm_head = next((t for t in targets if t.role == "lm_head"), None)
    tables = {init.name: init for init in model.graph.initializer
              if len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT}
    result = []
    for node in nodes:
        if node.op_type == "Transpose" and node.output[0] in transposes:
            continue
        if node.op_type != "Gather" or not (node.input[0] in transposes or node.input[0] in tables):
            result.append(node)
            continue
        if node.input[0] in transposes:
            names = lm_head_inputs[transposes[node.input[0]].input[0]]
            quantized = blocks[lm_head.node.name]
        else:  # an untied table [vocabulary, hidden]: the lm_head's bits, or 8
            table = numpy_helper.to_array(tables[node.input[0]]).astype(np.float64)
            like = blocks[lm_head.node.name] if lm_head is not None else None
            bits, block_size = (like.bits, like.block_size) if like is not None else (8, DEFAULT_BLOCK_SIZES[8])
            if table.shape[1] % block_size:
                result.append(node)
                continue
            quantized = (quantize_symmetric(table, 8, block_size) if bits == 8
                         else quantize_rtn(table, bits, block_size, symmetric=False))
            names = [f"{node.input[0]}_Q{bits}G{block_size}", f"{node.input[0]}_scale"]
            new_initializers += [numpy_helper.from_array(pack(quantized.q, bits), names[0]),
                                 numpy_helper.from_array(quantized.scale, names[1])]
            if quantized.zero is not None:
                names.append(f"{node.input[0]}_zero_point")
                new_initializers.append(numpy_helper.from_array(pack(quantized.zero, bits), names[2]))
        vocabulary, hidden = quantized.q.shape
        block_size = quantized.block_size
        shape_name, flat = f"{names[0]}_rows", f"{node.name}/rows"
        if not any(init.name == shape_name for init in new_initializers):
            new_initializers.append(numpy_helper.from_array(
                np.array([vocabulary, hidden * quantized.bits // 8], dtype=np.int64), shape_name))
        result.append(helper.make_node("Reshape", [names[0], shape_name], [flat], name=f"{node.name}/Reshape"))
        result.append(helper.make_node(
            "GatherBlockQuantized", [flat, node.input[1], *names[1:]], list(node.output),
            name=f"{node.name}BlockQuantized", domain="com.microsoft", bits=quantized.bits, block_size=block_size,
            gather_axis=0, quantize_axis=1,
        ))
    return result


def save(model, directory: Path) -> None:
    """model.onnx plus one external data file, replacing what is there (the weights are in memory)."""
    onnx = require("onnx", extra="onnx")
    directory.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, DATA_FILE):
        (directory / name).unlink(missing_ok=True)
    onnx.save(model, str(directory / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_FILE, size_threshold=EXTERNAL_DATA_THRESHOLD)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 rows, two 4-bit values a byte (low nibble first, a row padded to whole bytes) or one 8-bit value."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), dtype=np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


# -- block quantizers (w: [N, K] float64, blocks along K) --------------------------------------


def quantize_symmetric(weight: np.ndarray, bits: int, block_size: int) -> Blocks:
    """Signed blocks, scale = absmax / (2**(bits-1) - 1): exact for GGUF Q8_0 (and Q4_0-like) sources."""
    n_out, k_in = weight.shape
    grouped = weight.reshape(n_out, k_in // block_size, block_size)
    top = 2 ** (bits - 1) - 1
    scale = np.abs(grouped).max(axis=-1) / top
    scale[scale == 0] = 1.0
    q = np.clip(np.round(grouped / scale[..., None]), -top, top) + 2 ** (bits - 1)
    return Blocks(bits, q.reshape(n_out, k_in).astype(np.uint8), scale.astype(np.float32), None)


def quantize_rtn(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Blocks:
    """Round to nearest; asymmetric blocks span [min(w, 0), max(w, 0)] with an integer zero point."""
    if symmetric:
        return quantize_symmetric(weight, bits, block_size)
    n_out, k_in = weight.shape
    grouped = weight.reshape(n_out, k_in // block_size, block_size)
    scale, zero = asymmetric_parameters(grouped.min(axis=-1), grouped.max(axis=-1), bits)
    q = np.clip(np.round(grouped / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return Blocks(bits, q.reshape(n_out, k_in).astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8))


def asymmetric_parameters(low, high, bits: int):
    """Scale and integer zero point of blocks spanning [low, high] (widened to hold 0, so 0 is exact)."""
    xp = np if isinstance(low, np.ndarray) else require("torch", extra="onnx")
    top = 2**bits - 1
    low, high = xp.minimum(low, 0 * low), xp.maximum(high, 0 * high)
    scale = (high - low) / top
    scale[scale == 0] = 1.0
    zero = xp.clip(xp.round(-low / scale), 0, top)
    return scale, zero


def quantize_gptq(weight: np.ndarray, moment: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Blocks:
    """GPTQ (Frantar et al., 2022): quantize column by column, moving each column's error onto the columns
    not yet quantized through the inverse of ``moment`` (the sum of x x^T over the calibration inputs).

    A block's scale and zero point are taken from the updated weights when the loop reaches its first column.
    """
    torch = require("torch", extra="onnx")
    n_out, k_in = weight.shape
    top = 2**bits - 1
    w = torch.tensor(weight, dtype=torch.float32)
    h = torch.tensor(moment, dtype=torch.float64)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += GPTQ_DAMPING * torch.mean(torch.diag(h)) * torch.eye(k_in, dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.zeros((n_out, k_in), dtype=torch.uint8)
    scales = torch.zeros((n_out, k_in // block_size))
    zeros = torch.zeros((n_out, k_in // block_size))
    for start in range(0, k_in, GPTQ_COLUMNS):
        end = min(start + GPTQ_COLUMNS, k_in)
        chunk, errors, chunk_inverse = w[:, start:end].clone(), torch.zeros((n_out, end - start)), inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % block_size == 0:
                group = chunk[:, i:i + block_size]
                if symmetric:
                    scale = group.abs().max(dim=1).values / (2 ** (bits - 1) - 1)
                    scale[scale == 0] = 1.0
                    zero = torch.full((n_out,), float(2 ** (bits - 1)))
                else:
                    scale, zero = asymmetric_parameters(group.min(dim=1).values, group.max(dim=1).values, bits)
                scales[:, column // block_size], zeros[:, column // block_size] = scale, zero
            scale, zero = scales[:, column // block_size], zeros[:, column // block_size]
            values = chunk[:, i]
            quantized = torch.clamp(torch.round(values / scale) + zero, 0, top)
            q[:, column] = quantized.to(torch.uint8)
            error = (values - scale * (quantized - zero)) / chunk_inverse[i, i]
            chunk[:, i:] -= error[:, None] * chunk_inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    zero_points = None if symmetric else zeros.numpy().astype(np.uint8)
    return Blocks(bits, q.numpy(), scales.numpy().astype(np.float32), zero_points)


# -- calibration: second moments of each MatMul's input ---------------------------------------


def input_moments(model, targets: list[Target], recipe: Recipe, source_dir: Path) -> dict[str, np.ndarray]:
    """``sum x x^T`` of the inputs of ``targets`` over the calibration text, from the fp32 graph itself.

    The graph runs in plain onnxruntime with an empty past (so any batch-pinned graph runs with
    batch 1), each input of a MatMul added as an output.
    """
    onnx = require("onnx", extra="onnx")
    ort = require("onnxruntime", extra="onnx")
    transformers = require("transformers", extra="onnx")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir, trust_remote_code=recipe.model.trust_remote_code)
    q = recipe.quantization
    limit = min(CALIBRATION_TOKENS, recipe.shapes.sequence_length)
    samples = [ids for ids in calibration.token_samples(q.dataset, q.num_samples, tokenizer, limit) if ids]
    wanted = sorted({t.node.input[0] for t in targets})
    events.info(f"calibrating on {len(samples)} samples of '{q.dataset or 'default'}' ({sum(map(len, samples))} tokens)")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    graph.ClearField("value_info")
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = "batch_size"  # undo the artifact's pinned batch: calibrate one row at a time
    existing = {value.name for value in graph.output}
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in wanted if name not in existing)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="llmopt-calibrate-") as scratch:
        if probe.ByteSize() < PROTOBUF_LIMIT:
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        else:  # past protobuf's 2 GiB: the weights go to a side file
            onnx.save(probe, f"{scratch}/{MODEL_FILE}", save_as_external_data=True, location=DATA_FILE)
            session = ort.InferenceSession(f"{scratch}/{MODEL_FILE}", options, providers=["CPUExecutionProvider"])
    del probe
    torch = require("torch", extra="onnx")
    moments = {name: torch.zeros((0,)) for name in wanted}
    for ids in samples:
        outputs = session.run(wanted, graph_inputs(session, ids))
        for name, value in zip(wanted, outputs):
            x = torch.from_numpy(value.reshape(-1, value.shape[-1]))
            product = (x.T @ x).double()
            moments[name] = product if moments[name].numel() == 0 else moments[name] + product
    return {name: value.numpy() for name, value in moments.items()}


def graph_inputs(session, ids: list[int]) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and empty past key/values for one prompt of the builder's graph."""
    types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}
    feeds: dict[str, np.ndarray] = {}
    for meta in session.get_inputs():
        dtype = types.get(meta.type, np.float32)
        if meta.name == "input_ids":
            feeds[meta.name] = np.asarray([ids], dtype=dtype)
        elif meta.name == "attention_mask":
            feeds[meta.name] = np.ones((1, len(ids)), dtype=dtype)
        elif meta.name == "position_ids":
            feeds[meta.name] = np.arange(len(ids), dtype=dtype)[None]
        elif meta.name.startswith("past_key_values"):
            feeds[meta.name] = np.zeros((1, meta.shape[1], 0, meta.shape[3]), dtype=dtype)
        else:
            raise RecipeError(f"cannot calibrate: the graph has an input llmopt does not know ('{meta.name}')",
                              hint="use quantization.algorithm: rtn (no calibration)")
    return feeds
