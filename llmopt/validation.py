"""Parity with PyTorch: teacher-forced next-token agreement on a fixed text.

Both sides see the same token ids; we compare, position by position, the argmax of the next-token
logits (top-1 agreement) and the KL divergence KL(reference || candidate) of the distributions,
and report each side's perplexity on the text.
"""

from __future__ import annotations

from importlib import resources

import numpy as np


def validation_text() -> str:
    return resources.files("llmopt.data").joinpath("validation.txt").read_text(encoding="utf-8")


def validation_ids(tokenizer, max_tokens: int) -> list[int]:
    return tokenizer.encode(validation_text(), add_special_tokens=False)[:max_tokens]


# Positions per step of the float64 softmaxes: over a whole 192 x 49152 pair at once, their
# temporaries took 0.36 GB at the peak of an export (more with larger vocabularies).
CHUNK = 16


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, token_ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of token t+1 given tokens up to t."""
    targets = np.asarray(token_ids[1:])
    nll = []
    for start in range(0, len(targets), CHUNK):
        chunk = targets[start:start + CHUNK]  # position t predicts token t + 1
        nll.append(-_log_softmax(logits[start:start + len(chunk)])[np.arange(len(chunk)), chunk])
    return float(np.exp(np.concatenate(nll).mean())) if nll else float("nan")


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) of each position's next-token distribution."""
    rows = []
    for start in range(0, reference.shape[0], CHUNK):
        ref_log, cand_log = _log_softmax(reference[start:start + CHUNK]), _log_softmax(candidate[start:start + CHUNK])
        rows.append((np.exp(ref_log) * (ref_log - cand_log)).sum(axis=-1))
    return np.concatenate(rows)


def compare(reference: np.ndarray, candidate: np.ndarray, token_ids: list[int]) -> dict[str, float | int]:
    """Agreement metrics between two [T, V] logit arrays over the same tokens."""
    if reference.shape != candidate.shape:
        vocab = min(reference.shape[-1], candidate.shape[-1])  # padded vocabularies: compare the real part
        reference, candidate = reference[..., :vocab], candidate[..., :vocab]
    kl = kl_divergence(reference, candidate)
    return {
        "tokens": int(reference.shape[0]),
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "reference_perplexity": perplexity(reference, token_ids),
        "perplexity": perplexity(candidate, token_ids),
    }
