"""NNCF weight compression of the stateful OpenVINO IR, with calibration text for its data-aware options.

Each calibration sample is a prefill of up to CALIBRATION_TOKENS tokens, then DECODE_STEPS
one-token decode steps through the model's own state (``llmopt.quantize.calibration`` for the text).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from llmopt import events
from llmopt._deps import require
from llmopt.quantize import calibration
from llmopt.recipe import Recipe

CALIBRATION_TOKENS = 128  # prefill length of one calibration sample
DECODE_STEPS = 3  # one-token steps after each prefill, fed the text's next tokens


def compress_nncf(model, recipe: Recipe, arguments: dict[str, Any], tokenizer):
    nncf = require("nncf", extra="openvino")
    call = {key: value for key, value in arguments.items() if key != "method"}
    call["mode"] = nncf.CompressWeightsMode(call["mode"])
    if "sensitivity_metric" in call:
        call["sensitivity_metric"] = nncf.SensitivityMetric(call["sensitivity_metric"])
    pinned = {port.get_any_name(): port.get_partial_shape() for port in model.inputs}
    if "dataset" in call:
        model.reshape({name: batch_one(shape) for name, shape in pinned.items()})
        names = {name for port in model.inputs for name in port.get_names()}
        items = [{key: value for key, value in item.items() if key in names or not isinstance(value, np.ndarray)}
                 for item in calibration_items(recipe, tokenizer, call["dataset"])]
        call["dataset"] = nncf.Dataset(items)
        call["subset_size"] = len(items)
    nncf_logger = logging.getLogger("nncf")  # its bit-width table goes to the logger, not stdout
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with events.backend_output_hidden():
            compressed = nncf.compress_weights(model, **call)
    finally:
        nncf_logger.setLevel(level)
    if "dataset" in call:
        compressed.reshape(pinned)
    return compressed


def batch_one(shape):
    """The pinned input shape with batch 1, for calibration (the statistics do not depend on the batch)."""
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
