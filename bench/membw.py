#!/usr/bin/env python3
"""Memory bandwidth (numpy copy and sum over arrays far larger than the caches), and the decode bound.

Decoding one token reads every weight once, so at batch 1 decode tokens/s is at most
bandwidth / weight bytes. Give artifacts (or checkpoints) to print that bound for each, and a
``llmopt bench --json`` file to set each measured batch-1 decode rate against its bound:

    python bench/membw.py                                           # GB/s only
    python bench/membw.py out/smol-onnx out/smol-ov --bench results.jsonl --json

Bandwidth is the best of ``--repeat`` runs (the least disturbed); copy counts bytes read plus
written. numpy's copy and sum run on one thread, so this is single-core bandwidth unless
``--threads`` > 1, where each thread works on its own slice (numpy releases the GIL there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

WEIGHT_SUFFIXES = (".bin", ".data", ".onnx", ".safetensors", ".gguf", ".pt", ".pth", ".engine", ".neff")
NOT_WEIGHTS = ("tokenizer", "detokenizer")


def _timed(function, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def bandwidth(size_mib: int = 512, repeat: int = 5, threads: int = 1) -> dict:
    """GB/s (1e9 bytes) of a large copy (read + write) and a large sum (read)."""
    source = np.ones(size_mib * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    slices = [slice(i * len(source) // threads, (i + 1) * len(source) // threads) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(lambda part: np.copyto(target[part], source[part]), slices))

        def total():
            list(pool.map(lambda part: source[part].sum(), slices))

        copy(), total()  # touch every page first
        copy_s, sum_s = _timed(copy, repeat), _timed(total, repeat)
    return {"array_mib": size_mib, "threads": threads, "repeat": repeat,
            "copy_gb_s": round(2 * source.nbytes / copy_s / 1e9, 2), "sum_gb_s": round(source.nbytes / sum_s / 1e9, 2)}


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files of an artifact, a checkpoint or a single weights file."""
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*")
               if file.is_file() and file.suffix in WEIGHT_SUFFIXES and not file.name.startswith(NOT_WEIGHTS))


def measured_decode(bench_file: Path) -> dict[str, float]:
    """Batch-1 greedy decode tokens/s per subject from ``llmopt bench --json`` rows (the best case)."""
    rates: dict[str, float] = {}
    for line in bench_file.read_text().splitlines():
        row = json.loads(line)
        if row.get("status") == "ok" and row.get("batch_size") == 1 and row.get("decoding") == "greedy" and row.get("decode_tok_s"):
            rates[row["subject"]] = max(rates.get(row["subject"], 0.0), row["decode_tok_s"])
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="artifacts, checkpoints or weight files")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bench", type=Path, default=None, help="llmopt bench --json output to compare with")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    result = bandwidth(args.size_mib, args.repeat, args.threads)
    gb_s = result["sum_gb_s"]  # decode streams weights: read bandwidth is the bound
    measured = measured_decode(args.bench) if args.bench else {}
    bounds = []
    for path in args.paths:
        size = weight_bytes(path)
        bound = gb_s * 1e9 / size if size else None
        subject = next((name for name in measured if Path(name).resolve() == path.resolve()), None)
        rate = measured.get(subject) if subject else None
        bounds.append({"path": str(path), "weight_bytes": size, "bound_tok_s": round(bound, 1) if bound else None,
                       "measured_tok_s": rate, "of_bound": round(rate / bound, 3) if rate and bound else None})
    if args.json:
        print(json.dumps({"membw": result, "bounds": bounds}))
        return 0
    print(f"memory bandwidth: copy {result['copy_gb_s']} GB/s, sum {result['sum_gb_s']} GB/s "
          f"({args.size_mib} MiB arrays, {args.threads} thread(s), best of {args.repeat})")
    for item in bounds:
        line = (f"{item['path']}: {item['weight_bytes'] / 2**20:.1f} MiB of weights -> at most "
                f"{item['bound_tok_s']} tokens/s at batch 1 (sum bandwidth / weight bytes)")
        if item["measured_tok_s"]:
            line += f"; measured {item['measured_tok_s']:.1f} tokens/s = {item['of_bound']:.0%} of the bound"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
