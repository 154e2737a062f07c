"""Blockwise weight quantizers in MatMulNBits' layout: round to nearest, symmetric, and GPTQ.

``w[n, k] ~ (q[n, k] - zero[n, k // block]) * scale[n, k // block]`` over a weight ``[N, K]``
(float64 in, blocks along K, the input channels), with integer zero points (uint8), which is
what onnxruntime's fast CPU MatMulNBits kernels need. No backend import but torch, for GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmopt._deps import require

GPTQ_DAMPING = 0.01
GPTQ_COLUMNS = 128  # columns updated together (GPTQ's lazy batch)


@dataclass
class Blocks:
    """One weight in MatMulNBits form: ``w[n, k] = (q[n, k] - zero[n, k // block]) * scale[n, k // block]``."""

    bits: int
    q: np.ndarray  # uint8 [N, K], 0 .. 2**bits - 1
    scale: np.ndarray  # float32 [N, K // block]
    zero: np.ndarray | None  # uint8 [N, K // block]; None: the op's default 2**(bits - 1)
    # float32 [N, K // block]: a float zero point as an additive offset, w = (q - zero) * scale + offset
    # (zero 0): run as MatMulNBits plus the block sums of the activations times the offsets.
    offset: np.ndarray | None = None

    @property
    def block_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 rows, two 4-bit values a byte (low nibble first, a row padded to whole bytes) or one 8-bit value."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), dtype=np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


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
