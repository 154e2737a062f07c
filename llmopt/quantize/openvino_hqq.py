"""HQQ int4 in the OpenVINO IR: each linear weight replaced by a u4 (or i8) constant and its decompression.

The arrays come from ``llmopt.quantize.hqq``; the decompression (Convert -> Subtract float zero
point -> Multiply scale) is the pattern OpenVINO's CPU plugin fuses into FullyConnected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmopt._deps import require
from llmopt.quantize import hqq


def linear_weights(model) -> list[tuple[Any, Any, bool]]:
    """(weight output, the Constant node, is_backup) for each 2D constant weight of a MatMul (x @ W^T).

    Backup layers (int8 unless all_layers) are the embeddings (a constant a Gather reads) and the
    last MatMul (its output is a model result, through at most a Convert).
    """
    found: dict[str, tuple[Any, Any, bool]] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or not op.get_attributes().get("transpose_b"):
            continue
        weight = op.input_value(1)
        constant = weight.get_node()
        if constant.get_type_name() == "Convert":
            constant = constant.input_value(0).get_node()
        if constant.get_type_name() != "Constant" or len(constant.get_output_shape(0)) != 2:
            continue
        if not constant.get_output_element_type(0).is_real():
            continue
        readers = [target.get_node().get_type_name() for target in constant.output(0).get_target_inputs()]
        backup = "Gather" in readers or _feeds_result(op)
        name = constant.get_friendly_name()
        found[name] = (weight, constant, backup or found.get(name, (None, None, False))[2])
    return list(found.values())


def _feeds_result(op) -> bool:
    for target in op.output(0).get_target_inputs():
        node = target.get_node()
        if node.get_type_name() == "Result":
            return True
        if node.get_type_name() == "Convert" and any(
            nested.get_node().get_type_name() == "Result" for nested in node.output(0).get_target_inputs()
        ):
            return True
    return False


def fuse_parallel_linears(model) -> int:
    """One MatMul for the linear layers that read the same activation (q/k/v, gate/up); return how many
    MatMuls went away.

    Their weights are stacked along the output dimension and a VariadicSplit hands each reader its
    slice, so the result is exact; a quantizer that works row by row (HQQ's groups lie along the
    input dimension) quantizes every row as before. Fewer, larger MatMuls cost fewer kernel calls per
    token: at 135M parameters decode is bound by the calls, not by the bandwidth.
    """
    ops = require("openvino.opset13", extra="openvino")
    readers: dict[tuple[str, int], list[tuple[Any, Any]]] = {}
    for weight, constant, backup in linear_weights(model):
        if backup:
            continue
        for target in weight.get_target_inputs():
            matmul = target.get_node()
            if matmul.get_type_name() == "MatMul" and target.get_index() == 1:
                activation = matmul.input_value(0)
                readers.setdefault((activation.get_node().get_name(), activation.get_index()), []).append((matmul, constant))
    fused = 0
    for members in readers.values():
        if len(members) < 2 or len({constant.get_output_shape(0)[1] for _, constant in members}) != 1:
            continue
        data = [constant.get_data() for _, constant in members]
        stacked = ops.constant(np.concatenate(data, axis=0))
        first = members[0][0]
        stacked.set_friendly_name("+".join(constant.get_friendly_name() for _, constant in members))
        matmul = ops.matmul(first.input_value(0), stacked, False, True)
        matmul.set_friendly_name("+".join(op.get_friendly_name() for op, _ in members))
        split = ops.variadic_split(matmul, ops.constant(np.int64(-1)),
                                   ops.constant(np.array([part.shape[0] for part in data], dtype=np.int64)))
        for index, (op, _) in enumerate(members):
            for target in list(op.output(0).get_target_inputs()):
                target.replace_source_output(split.output(index))
        fused += len(members) - 1
    return fused


def compress_hqq(model, group_size: int, all_layers: bool, integer_zero_points: bool = False) -> None:
    """Replace each linear weight by an int4 (HQQ) or int8 (backup) constant and its decompression.

    ``integer_zero_points``: each int4 group's float zero point becomes the nearest u4 zero point (the
    pattern the CPU plugin runs with int8 activations, its fast path) plus the remainder, added after
    the MatMul as the activations' group sums times the remainders: exact, like the float form.
    """
    ov = require("openvino", extra="openvino")
    ops = require("openvino.opset13", extra="openvino")
    for weight, constant, backup in linear_weights(model):
        data = constant.get_data().astype(np.float32)
        out_features, in_features = data.shape
        remainder = None
        if backup and not all_layers:
            quantized = hqq.quantize_sym(data, group_size, bits=8)
            packed = ops.constant(quantized.q, ov.Type.i8)
        else:
            quantized = hqq.quantize_asym(data, group_size, bits=4)
            packed = ops.constant(quantized.q, ov.Type.u4)
        values = ops.convert(packed, ov.Type.f16)
        if quantized.zero is not None and integer_zero_points:
            integer, remainder = quantized.split_zero_point()
            values = ops.subtract(values, ops.convert(ops.constant(integer[..., None], ov.Type.u4), ov.Type.f16))
        elif quantized.zero is not None:
            values = ops.subtract(values, ops.constant(quantized.zero.astype(np.float16)))
        values = ops.multiply(values, ops.constant(quantized.scale.astype(np.float16)))
        values = ops.reshape(values, ops.constant(np.array([out_features, in_features], dtype=np.int64)), False)
        decompressed = ops.convert(values, constant.get_output_element_type(0))
        name = constant.get_friendly_name()
        packed.set_friendly_name(name)
        decompressed.set_friendly_name(f"{name}/decompressed")
        readers = list(constant.output(0).get_target_inputs())
        for target in readers:
            target.replace_source_output(decompressed.output(0))
        if remainder is not None:
            for target in readers:
                node = target.get_node()
                matmuls = ([reader.get_node() for reader in node.output(0).get_target_inputs()]
                           if node.get_type_name() == "Convert" else [node])
                for matmul in matmuls:
                    add_remainder(ops, matmul, remainder, group_size)


def add_remainder(ops, matmul, remainder: np.ndarray, group_size: int) -> None:
    """``y = MatMul(x) + groupsum(x) @ remainder^T`` after ``matmul`` (x @ W^T), for every reader of y."""
    if matmul.get_type_name() != "MatMul":
        return
    groups = remainder.shape[1]
    activation = matmul.input_value(0)
    rank = len(activation.get_partial_shape())
    shape = np.array([0] * (rank - 1) + [groups, group_size], dtype=np.int64)  # 0: keep that dimension
    grouped = ops.reshape(activation, ops.constant(shape), True)
    sums = ops.reduce_sum(grouped, ops.constant(np.array([-1], dtype=np.int64)), False)
    correction = ops.matmul(sums, ops.constant(np.ascontiguousarray(remainder.T.astype(np.float32))), False, False)
    readers = list(matmul.output(0).get_target_inputs())
    total = ops.add(matmul.output(0), correction)
    total.set_friendly_name(f"{matmul.get_friendly_name()}/remainder")
    for target in readers:
        target.replace_source_output(total.output(0))
