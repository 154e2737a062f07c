#!/usr/bin/env python3
"""``make bench``: the README's benchmark in one go, results in bench/results/.

1. the SmolLM2 artifacts: out/smol-onnx and out/smol-ov (exported from configs/ when missing), plus
   any of out/smol-ov-int4, out/smol-onnx-int4, out/smol-onnx-static, out/smol-ov-static that exist;
2. memory bandwidth (bench/membw.py);
3. ``llmopt bench`` of those artifacts against the PyTorch baseline (eager, static, compile), with
   prompt-lookup rows: bench.jsonl, bench.csv, bench.md, bench.png, and the table on stdout;
4. each artifact's batch-1 decode rate against its bandwidth bound;
5. llmopt's overhead over the bare native loops (bench/native_overhead.py);
6. llama.cpp on the same GGUF, if llama-cpp-python is installed (bench/llamacpp_peer.py).

    python bench/run_all.py [--quick]     # --quick: one ratio, few tokens, 2 repetitions (a smoke run)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
EXPORTS = {"out/smol-onnx": "configs/smollm2-onnx.yaml", "out/smol-ov": "configs/smollm2-openvino.yaml"}
OPTIONAL = ("out/smol-ov-int4", "out/smol-onnx-int4", "out/smol-onnx-static", "out/smol-ov-static")
CHECKPOINT = ROOT / "models" / "SmolLM2-135M-Instruct"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(message: str) -> None:
    print(f"run_all: {message}", file=sys.stderr, flush=True)


def llmopt(*args: str) -> None:
    command = "import sys; from llmopt.cli.main import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", command, *args], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one ratio, 16 new tokens, 2 repetitions")
    parser.add_argument("--baseline", default="pytorch", help="as llmopt bench --baseline")
    args = parser.parse_args(argv)

    import membw
    import native_overhead

    from llmopt.benchmark import BenchConfig, parse_baselines, report, suite

    RESULTS.mkdir(parents=True, exist_ok=True)
    for output, config in EXPORTS.items():
        if not (ROOT / output / "llmopt.json").is_file():
            log(f"exporting {output} from {config}")
            llmopt("export", "--config", config, "-o", output)
    artifacts = list(EXPORTS) + [path for path in OPTIONAL if (ROOT / path / "llmopt.json").is_file()]

    log("memory bandwidth")
    bandwidth = membw.bandwidth(256 if args.quick else 1024, 3 if args.quick else 5)
    log(f"copy {bandwidth['copy_gb_s']} GB/s, sum {bandwidth['sum_gb_s']} GB/s")

    config = BenchConfig(
        artifacts=[str(ROOT / path) for path in artifacts], baselines=parse_baselines([args.baseline]),
        input_ratios=[0.25] if args.quick else [0.25, 0.5, 0.75], new_tokens=16 if args.quick else 128,
        repetitions=2 if args.quick else 5, warmup=1, prompt_lookup=3,
    )
    log(f"llmopt bench: {', '.join(artifacts)} against {', '.join(config.baselines) or 'no baseline'}")
    result = suite.run(config)
    for fmt, name in (("json", "bench.jsonl"), ("csv", "bench.csv"), ("md", "bench.md")):
        (RESULTS / name).write_text(report.render(result.rows, result.machine, fmt))
    report.plot(result.rows, RESULTS / "bench.png")
    report.print_table(result.rows, result.machine, result.notes)

    bounds = []
    for path in artifacts + ([str(CHECKPOINT)] if CHECKPOINT.is_dir() else []):
        size = membw.weight_bytes(ROOT / path)
        rates = [row["decode_tok_s"] for row in result.rows if row["status"] == "ok" and row["batch_size"] == 1
                 and row["decoding"] == "greedy" and row["prompt"] == "synthetic"
                 and (Path(row["subject"]) == ROOT / path or (path == str(CHECKPOINT) and row["subject"] == "pytorch:eager"))]
        bound = bandwidth["sum_gb_s"] * 1e9 / size if size else None
        best = max(rates) if rates else None
        bounds.append({"path": path, "weight_bytes": size, "bound_tok_s": round(bound, 1) if bound else None,
                       "best_decode_tok_s": best, "of_bound": round(best / bound, 3) if best and bound else None})
        if bound:
            log(f"{path}: bound {bound:.0f} tokens/s" + (f", best measured {best:.1f} ({best / bound:.0%})" if best else ""))
    (RESULTS / "membw.json").write_text(json.dumps({"membw": bandwidth, "bounds": bounds, "machine": result.machine}, indent=2))

    log("native overhead")
    overhead = [native_overhead.measure(ROOT / path, 2 if args.quick else 7, 16 if args.quick else 128) for path in artifacts]
    (RESULTS / "native_overhead.jsonl").write_text("".join(json.dumps(item) + "\n" for item in overhead))
    for item in overhead:
        log(f"{item['artifact']}: " + (item.get("skipped") or f"ratio to native {item['ratio_to_native']}, ok={item['ok']}"))

    if importlib.util.find_spec("llama_cpp") is not None and GGUF.is_file() and CHECKPOINT.is_dir():
        log("llama.cpp peer")
        import llamacpp_peer

        peer_args = ["--baseline", "pytorch:eager", "--output", str(RESULTS / "llamacpp.jsonl"),
                     "--new-tokens", "16" if args.quick else "128", "-r", "2" if args.quick else "5"]
        if args.quick:
            peer_args += ["--input-ratios", "0.25"]
        llamacpp_peer.main(peer_args)
    else:
        log("llama.cpp peer skipped (pip install llama-cpp-python, and make model)")
    log(f"results in {RESULTS}")
    return 1 if result.failed or any(not item.get("ok", True) for item in overhead) else 0


if __name__ == "__main__":
    sys.exit(main())
