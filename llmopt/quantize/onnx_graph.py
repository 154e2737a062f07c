"""The ONNX graph side of the onnx quantization pass: find the builder's MatMuls, write MatMulNBits.

Every MatMul with a constant weight becomes a ``com.microsoft.MatMulNBits`` node over the blocks
``llmopt.quantize.blocks`` computed, and the embedding's ``Gather`` (``Gather(Transpose(lm_head))``
when tied) a ``GatherBlockQuantized`` that reads the lm_head's blocks. ``save`` writes model.onnx
and one external data file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmopt._deps import require
from llmopt.quantize.blocks import Blocks, pack, quantize_rtn, quantize_symmetric

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
LM_HEAD = "/lm_head/MatMul"
# 4: int8 activations (per block) and the int8 dot-product kernels, the only fast 8-bit kernel on CPU.
# 1 (fp32 activations) has a fast 4-bit kernel but no 8-bit one, and did not help the int4 nodes.
ACCURACY_LEVEL = 4
EXTERNAL_DATA_THRESHOLD = 1024  # smaller tensors (shapes) stay inside model.onnx for shape inference


@dataclass
class Target:
    node: Any  # the MatMul NodeProto
    weight: str  # its constant input [K, N]
    role: str  # qkv_proj, o_proj, ..., lm_head
    layer: int | None
    shape: tuple[int, int]  # the weight's [K, N]


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


def initializer_array(model, name: str) -> np.ndarray:
    onnx = require("onnx", extra="onnx")
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init).astype(np.float64)
    raise KeyError(name)


def rewrite(model, targets: list[Target], blocks: dict[str, Blocks], table_block_size: int) -> None:
    """MatMul -> MatMulNBits; the tied embedding's Transpose -> Gather -> GatherBlockQuantized on the lm_head blocks
    (an untied table without a quantized lm_head: 8-bit blocks of ``table_block_size``)."""
    onnx = require("onnx", extra="onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = model.graph
    replaced = {t.node.name: t for t in targets}
    new_initializers = []
    lm_head_inputs: dict[str, list[str]] = {}
    block_sums: dict[tuple[str, int], str] = {}  # (activation, block size) -> its block sums, computed once
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
        output = node.output[0] if quantized.offset is None else f"{node.output[0]}/integer"
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *names], [output], name=f"{node.name}_Q{quantized.bits}",
            domain="com.microsoft", K=k_in, N=n_out, bits=quantized.bits, block_size=block_size,
            accuracy_level=ACCURACY_LEVEL,
        ))
        if quantized.offset is not None:
            nodes += offset_correction(node, output, quantized, block_sums, new_initializers)
        if target.role == "lm_head":
            lm_head_inputs[target.weight] = names
    nodes = share_embedding(model, nodes, lm_head_inputs, blocks, targets, new_initializers, table_block_size)
    used = {name for node in nodes for name in node.input} | {value.name for value in graph.output}
    kept = [init for init in graph.initializer if init.name in used]  # the float weights are read no more
    graph.ClearField("initializer")
    graph.initializer.extend(kept + new_initializers)
    graph.ClearField("node")
    graph.node.extend(nodes)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def offset_correction(node, integer_output: str, quantized: Blocks, block_sums: dict, new_initializers: list) -> list:
    """``y = MatMulNBits(x) + blocksum(x) @ offset^T``: the float zero points' share, exactly, in fp32.

    With ``w = q * scale + offset`` per block (zero point 0), ``x . w`` splits into the integer-kernel
    product and the sum of each block of ``x`` times that block's offset: a MatMul K / block times
    smaller than the weight's. The block sums of one activation are shared by every MatMul reading it.
    """
    onnx = require("onnx", extra="onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    n_out, k_in = quantized.q.shape
    block_size = quantized.block_size
    added = []
    key = (node.input[0], block_size)
    if key not in block_sums:
        shape_name = f"block_shape_{k_in // block_size}x{block_size}"
        if not any(init.name == shape_name for init in new_initializers):
            new_initializers.append(numpy_helper.from_array(np.array([0, 0, k_in // block_size, block_size],
                                                                     dtype=np.int64), shape_name))
        if not any(init.name == "block_sum_axes" for init in new_initializers):
            new_initializers.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "block_sum_axes"))
        blocks_name, sums_name = f"{node.input[0]}/blocks{block_size}", f"{node.input[0]}/block_sums{block_size}"
        added.append(helper.make_node("Reshape", [node.input[0], shape_name], [blocks_name], name=f"{blocks_name}/Reshape"))
        added.append(helper.make_node("ReduceSum", [blocks_name, "block_sum_axes"], [sums_name], keepdims=0,
                                      name=f"{sums_name}/ReduceSum"))
        block_sums[key] = sums_name
    offsets = f"{node.input[1]}_offset"
    new_initializers.append(numpy_helper.from_array(np.ascontiguousarray(quantized.offset.T.astype(np.float32)), offsets))
    correction = f"{node.output[0]}/offset"
    added.append(helper.make_node("MatMul", [block_sums[key], offsets], [correction], name=f"{node.name}_offset"))
    added.append(helper.make_node("Add", [integer_output, correction], list(node.output), name=f"{node.name}_Add"))
    return added


def share_embedding(model, nodes, lm_head_inputs, blocks, targets, new_initializers, table_block_size):
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
            bits, block_size = (like.bits, like.block_size) if like is not None else (8, table_block_size)
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
