#!/usr/bin/env python3
"""``make bench``: the README's benchmark in one go, results in bench/results/.

1. the SmolLM2 artifacts, exported from configs/ when missing: fp32 and int4 for ONNX and OpenVINO
   at batch 1, and the int4 builds at batch 4;
2. memory bandwidth on all cores (bench/membw.py), for the decode bound;
3. one ``llmopt bench`` run of every artifact, the PyTorch baselines (eager, static, compile) and,
   when llama-cpp-python is installed, llama.cpp on the same GGUF (bench/llamacpp_peer.py), on the
   goals' case (a 128-token prompt, 128 new tokens; --sweep: 25/50/75 % of the sequence length),
   every subject profiled (--profile), with prompt-lookup rows and assisted
   generation (the OpenVINO fp32 build drafted by its int4 build) on a summarization prompt:
   bench.jsonl, bench.csv, bench.md, bench.png, and the table on stdout;
4. llmopt's overhead over the bare native loops (bench/native_overhead.py);
5. the performance goals (README), checked against rows of this one run: goals.json.

    python bench/run_all.py [--quick] [--sweep] [-r 5] [--compare DIR ...]
    # --quick: 16 new tokens, 2 repetitions (a smoke run); --compare: more artifacts (say, built by an earlier
    # llmopt) measured in the same run, outside the goals
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
# output -> (recipe, extra export flags)
ARTIFACTS = {
    "out/smol-onnx": ("configs/smollm2-onnx.yaml", []),
    "out/smol-ov": ("configs/smollm2-openvino.yaml", []),
    "out/smol-onnx-int4": ("configs/smollm2-onnx-int4.yaml", []),
    "out/smol-ov-int4": ("configs/smollm2-openvino-int4.yaml", []),
    "out/smol-onnx-int4-b4": ("configs/smollm2-onnx-int4.yaml", ["--batch-size", "4"]),
    "out/smol-ov-int4-b4": ("configs/smollm2-openvino-int4.yaml", ["--batch-size", "4"]),
}
DRAFTS = ("out/smol-ov-int4",)  # drafts for the same target's other artifacts (assisted-generation rows)
CHECKPOINT = ROOT / "models" / "SmolLM2-135M-Instruct"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GOAL_INPUT = 128  # the goals' case: 128-token prompt, 128 new tokens


def log(message: str) -> None:
    print(f"run_all: {message}", file=sys.stderr, flush=True)


def llmopt(*args: str) -> None:
    command = "import sys; from llmopt.cli.main import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", command, *args], cwd=ROOT, check=True)


def llamacpp_subject():
    """llama.cpp on the checkpoint's own GGUF, as one more subject of the same run (None if not installed)."""
    if importlib.util.find_spec("llama_cpp") is None or not GGUF.is_file():
        log("llama.cpp peer skipped (pip install llama-cpp-python, and make model)")
        return None
    import llamacpp_peer

    return llamacpp_peer.subject(GGUF, CHECKPOINT, sequence_length=512)


def _row(rows, *, subject=None, prefix=None, batch_size=1, weights=None):
    """The greedy synthetic row of the goals' case for one subject (or the fastest matching one)."""
    found = [row for row in rows if row["status"] == "ok" and row["prompt"] == "synthetic" and row["decoding"] == "greedy"
             and row["batch_size"] == batch_size and row["input_length"] == GOAL_INPUT
             and (subject is None or row["subject"] == subject)
             and (prefix is None or row["subject"].startswith(prefix))
             and (weights is None or (row["kind"] == "artifact" and row["weights"] == weights))]
    return max(found, key=lambda row: row["decode_tok_s"] or 0.0) if found else None


def goals(rows: list[dict], bounds: list[dict], overhead: list[dict]) -> list[dict]:
    """The README's performance goals, each with the measured value and whether it is met (None: not measured)."""
    best = _row(rows, weights="int4")  # the fastest int4 artifact (both shipped int4 recipes meet the quality goals)
    eager = _row(rows, subject="pytorch:eager")
    llama = _row(rows, prefix="llama.cpp")
    batch4 = _row(rows, weights="int4", batch_size=4)
    checks = []

    def check(goal: str, value, limit, at_least: bool, subject: str | None):
        met = None if value is None else (value >= limit if at_least else value <= limit)
        checks.append({"goal": goal, "value": None if value is None else round(value, 3), "limit": limit,
                       "met": met, "subject": subject})

    def ratio(a, b, key):
        return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None

    name = best["subject"] if best else None
    check("int4 decode tokens/s vs llama.cpp (batch 1, best target)", ratio(best, llama, "decode_tok_s"), 1.5, True, name)
    check("int4 decode tokens/s vs PyTorch eager (batch 1, best target)", ratio(best, eager, "decode_tok_s"), 8.0, True, name)
    for target in ("onnx", "openvino"):  # each CPU target's int4 artifact at batch 1
        row = _row([r for r in rows if r.get("target") == target], weights="int4")
        fp32 = _row([r for r in rows if r.get("target") == target and r.get("kind") == "artifact"], weights="none")
        subject = row["subject"] if row else None
        check(f"{target} int4 decode vs llama.cpp (batch 1)", ratio(row, llama, "decode_tok_s"), 1.0, True, subject)
        check(f"{target} int4 TTFT vs PyTorch eager", ratio(row, eager, "ttft_ms"), 0.25, False, subject)
        check(f"{target} int4 TTFT vs llama.cpp", ratio(row, llama, "ttft_ms"), 0.25, False, subject)
        check(f"{target} int4 decode vs its fp32 build", ratio(row, fp32, "decode_tok_s"), 2.5, True, subject)
    check("int4 batch-4 decode tokens/s vs llama.cpp batch 1", ratio(batch4, llama, "decode_tok_s"), 2.0, True,
          batch4["subject"] if batch4 else None)
    bound = next((item for item in bounds if best and Path(item["path"]).resolve() == Path(best["subject"]).resolve()), None)
    check("int4 batch-1 decode as a fraction of the bandwidth bound",
          best["decode_tok_s"] / bound["bound_tok_s"] if best and bound and bound["bound_tok_s"] else None, 0.6, True, name)
    for item in overhead:
        if "ratio_to_native" in item:
            check("llmopt run path / bare native loop", item["ratio_to_native"]["generate"], 1.05, False, item["artifact"])
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 new tokens, 2 repetitions")
    parser.add_argument("--sweep", action="store_true", help="input lengths at 25/50/75 %% of the sequence length "
                                                              "(default: the goals' case, 128 in, 128 new)")
    parser.add_argument("--baseline", default="pytorch:all", help="as llmopt bench --baseline")
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--compare", nargs="*", default=[], metavar="ARTIFACT",
                        help="more artifacts in the same run (e.g. the same recipes built by an earlier llmopt, for a "
                             "before/after with its baseline from this run); reported, not counted in the goals")
    args = parser.parse_args(argv)

    import membw
    import native_overhead

    from llmopt.benchmark import BenchConfig, parse_baselines, report, suite
    from llmopt.hardware import default_threads

    RESULTS.mkdir(parents=True, exist_ok=True)
    for output, (config, flags) in ARTIFACTS.items():
        if not (ROOT / output / "llmopt.json").is_file():
            log(f"exporting {output} from {config} {' '.join(flags)}")
            llmopt("export", "--config", config, *flags, "-o", output)
    artifacts = list(ARTIFACTS)

    threads = default_threads()
    log(f"memory bandwidth ({threads} threads)")
    bandwidth = membw.bandwidth(256 if args.quick else 1024, 3 if args.quick else 5, threads=threads)
    log(f"copy {bandwidth['copy_gb_s']} GB/s, sum {bandwidth['sum_gb_s']} GB/s")

    peer = llamacpp_subject()
    compared = list(args.compare)
    config = BenchConfig(
        artifacts=[str(ROOT / path) for path in artifacts] + compared, baselines=parse_baselines([args.baseline]),
        baseline_model=str(CHECKPOINT),
        input_ratios=[0.25, 0.5, 0.75] if args.sweep else None,
        input_lengths=None if args.sweep else [GOAL_INPUT], new_tokens=16 if args.quick else 128,
        repetitions=2 if args.quick else args.repetitions, warmup=1, prompt_lookup=3,
        drafts=[str(ROOT / path) for path in DRAFTS], draft_tokens=3, extra_subjects=[peer] if peer else [],
        profile=True,
    )
    log(f"llmopt bench: {', '.join(artifacts)}{' and llama.cpp' if peer else ''} against "
        f"{', '.join(config.baselines) or 'no baseline'}")
    result = suite.run(config)
    report.write_all(result.rows, result.machine, RESULTS)
    report.print_table(result.rows, result.machine, result.notes)
    report.print_profiles(result.rows)

    bounds = []
    for path in artifacts + [str(GGUF)]:
        size = membw.weight_bytes(ROOT / path)
        bound = bandwidth["sum_gb_s"] * 1e9 / size if size else None
        bounds.append({"path": str(ROOT / path), "weight_bytes": size, "bound_tok_s": round(bound, 1) if bound else None})
        if bound:
            log(f"{path}: {size / 2**20:.1f} MiB of weights, bound {bound:.0f} tokens/s at batch 1")
    (RESULTS / "membw.json").write_text(json.dumps({"membw": bandwidth, "bounds": bounds, "machine": result.machine}, indent=2))

    log("native overhead")
    overhead = [native_overhead.measure(ROOT / path, 2 if args.quick else 7, 16 if args.quick else 128) for path in artifacts]
    (RESULTS / "native_overhead.jsonl").write_text("".join(json.dumps(item) + "\n" for item in overhead))
    for item in overhead:
        log(f"{item['artifact']}: " + (item.get("skipped") or f"ratio to native {item['ratio_to_native']}, ok={item['ok']}"))

    checks = goals([row for row in result.rows if row["subject"] not in compared], bounds, overhead)
    (RESULTS / "goals.json").write_text(json.dumps(checks, indent=2))
    for item in checks:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[item["met"]]
        value = "-" if item["value"] is None else f"{item['value']:.3f}"
        log(f"goal: {item['goal']}: {value} (limit {item['limit']}): {verdict} [{item['subject']}]")
    log(f"results in {RESULTS}")
    return 1 if result.failed or any(not item.get("ok", True) for item in overhead) else 0


if __name__ == "__main__":
    sys.exit(main())
