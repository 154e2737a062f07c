"""From per-repetition timings to one row of metrics.

Definitions (per repetition; a row reports the median over repetitions, latencies also p90/p99):

* TTFT: prefill, from the call to the first generated token (the runner's ``ttft_s``).
* end-to-end: the whole ``generate`` call, timed around it by the worker.
* TPOT: decode time / (new tokens - 1), the time per output token after the first.
* decode tokens/s: batch * (new tokens - 1) / decode time, summed over the batch.
* throughput: (input + output tokens, summed over the batch) / end-to-end seconds.

Rates are computed from the median times (so throughput == total tokens / median end-to-end).

Per subject (its worker): load time is time to ready, opening the artifact plus one single-token
generation (openvino-genai builds its pipeline on the first call; ``open_s`` is the opening alone);
peak RSS is the kernel's high-water mark, reset at the start of each case, so each row has its own.
"""

from __future__ import annotations

import numpy as np

HIGH_VARIANCE = 1.2  # p90 / median above this is flagged


def percentiles(values: list[float]) -> tuple[float, float, float]:
    array = np.asarray(values, dtype=np.float64)
    median, p90, p99 = np.percentile(array, [50, 90, 99])
    return float(median), float(p90), float(p99)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def summarize(samples: dict[str, list], batch_size: int, input_length: int) -> tuple[dict, list[str]]:
    """Metrics for one case from its samples (lists of ttft_s, decode_s, e2e_s, new_tokens)."""
    notes: list[str] = []
    generated = samples["new_tokens"]  # per repetition: generated tokens summed over the batch
    if len(set(generated)) > 1:
        notes.append(f"generated token counts varied across repetitions: {sorted(set(generated))}")
    output_tokens = min(generated)
    per_row = output_tokens / batch_size
    ttft = percentiles(samples["ttft_s"])
    decode = percentiles(samples["decode_s"])
    e2e = percentiles(samples["e2e_s"])
    steps = per_row - 1
    total_tokens = batch_size * input_length + output_tokens
    metrics = {
        "reps": len(samples["e2e_s"]),
        "total_tokens": int(total_tokens),
        "ttft_ms": _ms(ttft[0]), "ttft_ms_p90": _ms(ttft[1]), "ttft_ms_p99": _ms(ttft[2]),
        "tpot_ms": _ms(decode[0] / steps) if steps > 0 else None,
        "tpot_ms_p90": _ms(decode[1] / steps) if steps > 0 else None,
        "tpot_ms_p99": _ms(decode[2] / steps) if steps > 0 else None,
        "e2e_ms": _ms(e2e[0]), "e2e_ms_p90": _ms(e2e[1]), "e2e_ms_p99": _ms(e2e[2]),
        "decode_tok_s": round(batch_size * steps / decode[0], 3) if steps > 0 and decode[0] > 0 else None,
        "throughput_tok_s": round(total_tokens / e2e[0], 3) if e2e[0] > 0 else None,
    }
    spread = {name: (p90 / median if median > 0 else 1.0) for name, (median, p90, _) in
              (("TTFT", ttft), ("decode", decode), ("end-to-end", e2e))}
    noisy = {name: ratio for name, ratio in spread.items() if ratio > HIGH_VARIANCE}
    metrics["high_variance"] = bool(noisy)
    if noisy:
        notes.append("high variance: " + ", ".join(f"{name} p90/median {ratio:.2f}" for name, ratio in noisy.items()))
    return metrics, notes


def speedups(row: dict, reference: dict) -> dict:
    """Decode tokens/s ratio (row / reference) and TTFT speedup (reference / row): above 1 is faster."""
    decode = ttft = None
    if row.get("decode_tok_s") and reference.get("decode_tok_s"):
        decode = round(row["decode_tok_s"] / reference["decode_tok_s"], 3)
    if row.get("ttft_ms") and reference.get("ttft_ms"):
        ttft = round(reference["ttft_ms"] / row["ttft_ms"], 3)
    return {"decode_speedup": decode, "ttft_speedup": ttft}
