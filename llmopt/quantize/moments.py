"""Calibration for GPTQ on the onnx target: the second moments ``sum x x^T`` of each MatMul's input.

The fp32 graph itself runs in plain onnxruntime over the calibration text
(``llmopt.quantize.calibration``), each MatMul input added as a graph output.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from llmopt import events
from llmopt._deps import require
from llmopt.errors import RecipeError
from llmopt.quantize import calibration
from llmopt.quantize.onnx_graph import DATA_FILE, MODEL_FILE, Target
from llmopt.recipe import Recipe

CALIBRATION_TOKENS = 256
PROTOBUF_LIMIT = 2**31 - 2**26  # a serialized ModelProto must stay under 2 GiB


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
