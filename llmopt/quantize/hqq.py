"""Data-free group-wise weight quantization with float zero points (HQQ), in numpy.

Asymmetric int4: ``w ~ (q - zero) * scale`` per group of ``group_size`` input channels, with
``q`` in [0, 15] and a float ``zero``. The scale comes from the group's range; the zero point is
then refined by half-quadratic optimization (Badri & Shaji, "Half-Quadratic Quantization of
Large Machine Learning Models", 2023), which fits the bulk of the weights rather than their
outliers. Because the zero point is not rounded to an integer, a checkpoint de-quantized from a
GGUF Q4_1 file (blocks of 32 with ``w = d * q + m``) comes back exactly with group size 32: the
first iterate already has zero error, and the optimizer stops there.

Symmetric int8 (``w ~ q * scale``, ``q`` in [-127, 127]) is exact the same way for Q8_0 blocks.
Backend modules turn the arrays into their own formats (OpenVINO: a u4/i8 constant with a
Convert -> Subtract -> Multiply decompression that the CPU plugin fuses into FullyConnected).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ITERATIONS = 20
LP_NORM = 0.7  # the sparsity-promoting norm of the error (p < 1)
BETA, KAPPA = 10.0, 1.01  # half-quadratic penalty and its growth per iteration


@dataclass
class Quantized:
    q: np.ndarray  # [out, groups, group_size]: uint8 (int4 asym, 0..15) or int8 (sym)
    scale: np.ndarray  # [out, groups, 1] float32
    zero: np.ndarray | None  # [out, groups, 1] float32; None for symmetric

    def split_zero_point(self, levels: int = 15) -> tuple[np.ndarray, np.ndarray]:
        """The float zero point as the nearest integer one in [0, levels] plus a remainder, exactly:
        ``(q - zero) * scale = (q - integer) * scale + remainder``. Returns (integer, remainder), both
        [out, groups] (uint8, float32): the form the runtimes' fast integer kernels take."""
        integer = np.clip(np.rint(self.zero), 0, levels)
        remainder = (integer - self.zero) * self.scale
        return integer[..., 0].astype(np.uint8), remainder[..., 0].astype(np.float32)

    def dequantize(self) -> np.ndarray:
        values = self.q.astype(np.float32)
        if self.zero is not None:
            values = values - self.zero
        weight = values * self.scale
        return weight.reshape(weight.shape[0], -1)


def grouped(weight: np.ndarray, group_size: int) -> np.ndarray:
    """[out, in] -> [out, in / group_size, group_size]; -1 is one group per output channel."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    if in_features % size:
        raise ValueError(f"group size {size} does not divide {in_features}")
    return weight.astype(np.float32).reshape(out_features, in_features // size, size)


def _shrink(error: np.ndarray, beta: float) -> np.ndarray:
    """Proximal operator of the l_p norm (p < 1), the generalized soft threshold of HQQ."""
    magnitude = np.abs(error)
    with np.errstate(divide="ignore"):
        threshold = np.where(magnitude > 0, magnitude ** (LP_NORM - 1.0), 0.0) / beta
    return np.sign(error) * np.maximum(magnitude - threshold, 0.0)


def quantize_asym(weight: np.ndarray, group_size: int, bits: int = 4, iterations: int = ITERATIONS,
                  scale_dtype=np.float16) -> Quantized:
    """Asymmetric ``bits``-bit quantization with float zero points, refined by HQQ."""
    levels = (1 << bits) - 1
    groups = grouped(weight, group_size)
    low, high = groups.min(axis=-1, keepdims=True), groups.max(axis=-1, keepdims=True)
    scale = (high - low) / levels
    scale[scale == 0] = 1.0
    scale = scale.astype(scale_dtype).astype(np.float32)  # the stored precision, so zero fits it
    scaled = groups / scale
    zero = -low / scale
    best_zero, best_error = zero, _error(scaled, zero, levels)
    beta = BETA
    for _ in range(iterations):
        if best_error == 0.0:
            break
        q = np.clip(np.rint(scaled + zero), 0, levels)
        residual = _shrink(scaled - (q - zero), beta)
        zero = np.mean(q - (scaled - residual), axis=-1, keepdims=True)
        beta *= KAPPA
        error = _error(scaled, zero, levels)
        if error >= best_error:
            break
        best_zero, best_error = zero, error
    q = np.clip(np.rint(scaled + best_zero), 0, levels).astype(np.uint8)
    return Quantized(q=q, scale=scale, zero=best_zero.astype(np.float32))


def _error(scaled: np.ndarray, zero: np.ndarray, levels: int) -> float:
    q = np.clip(np.rint(scaled + zero), 0, levels)
    return float(np.mean(np.abs(scaled - (q - zero))))


def quantize_sym(weight: np.ndarray, group_size: int, bits: int = 8, scale_dtype=np.float16) -> Quantized:
    """Symmetric ``bits``-bit quantization, one absmax scale per group."""
    levels = (1 << (bits - 1)) - 1
    groups = grouped(weight, group_size)
    scale = np.abs(groups).max(axis=-1, keepdims=True) / levels
    scale[scale == 0] = 1.0
    scale = scale.astype(scale_dtype).astype(np.float32)
    q = np.clip(np.rint(groups / scale), -levels, levels).astype(np.int8)
    return Quantized(q=q, scale=scale, zero=None)
