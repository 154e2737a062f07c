"""One subject (an artifact, or the PyTorch baseline in one mode) measured in a fresh process.

``python -m llmopt.benchmark worker --plan PLAN.json --result RESULT.json``: the parent writes the
plan (subject, thread count, repetitions, and every case with its prompt ids), the worker loads the
subject once and runs each case (warmup, then timed repetitions), writing the raw samples as JSON.
Progress goes to stdout as ``@@llmopt-bench {json}`` lines. A fresh process per subject keeps
memory and thread pools clean: only one runtime is loaded, and peak RSS is this subject's own.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import traceback
from pathlib import Path

PROGRESS_PREFIX = "@@llmopt-bench "
# torch.compile reaches its steady graphs on the second call: the static cache's first fill
# recompiles once. Compiled subjects get at least this many untimed runs per case.
COMPILE_WARMUP = 2


def emit(event: str, **fields) -> None:
    sys.stdout.write(PROGRESS_PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _accepts(callable_, name: str) -> bool:
    try:
        return name in inspect.signature(callable_).parameters
    except (TypeError, ValueError):
        return False


def open_subject(subject: dict, threads: int):
    """Load the runner; returns (runner, how threads were set)."""
    if subject["kind"] == "pytorch":
        from llmopt.runners.pytorch import PyTorchRunner

        runner = PyTorchRunner.from_checkpoint(
            subject["path"], batch_size=subject.get("batch_size") or 1, sequence_length=subject["sequence_length"],
            mode=subject["mode"], dtype=subject.get("dtype") or "fp32", threads=threads,
        )
        return runner, f"torch.set_num_threads({threads})"
    if subject.get("factory"):  # a peer runtime, e.g. bench/llamacpp_peer.py:open_runner
        import importlib

        if subject.get("pythonpath"):
            sys.path.insert(0, subject["pythonpath"])
        module, _, function = subject["factory"].partition(":")
        factory = getattr(importlib.import_module(module), function)
        runner = factory(subject["path"], subject["batch_size"], subject["sequence_length"], threads=threads)
        return runner, f"factory option threads={threads}"
    from llmopt import artifact
    from llmopt.registry import runner_class

    manifest = artifact.read_manifest(Path(subject["path"]))
    cls = runner_class(manifest.target, manifest.static)
    options = {"threads": threads} if _accepts(cls.__init__, "threads") else {}
    runner = cls.load(subject["path"], verify=False, **options)
    return runner, (f"runner option threads={threads}" if options else "runtime default (all physical cores)")


def set_speculation(runner, speculation: dict | None) -> None:
    """Plain or speculative decoding for the next case (``speculation``: a runners.base.Speculation as a dict)."""
    from llmopt.runners.base import Speculation

    if speculation is None:
        if getattr(runner, "speculation", None) is not None:
            runner.set_speculation(None)
        return
    if not hasattr(runner, "set_speculation"):
        raise RuntimeError(f"{type(runner).__name__} does not support speculative decoding")
    runner.set_speculation(Speculation(**speculation))


def run_case(runner, case: dict, warmup: int, repetitions: int, peak, on_rep) -> dict:
    from llmopt.runners.base import SamplingConfig

    batch = case["prompt_ids"]
    sampling = SamplingConfig(max_new_tokens=case["new_tokens"], temperature=0.0)
    samples: dict[str, list] = {"ttft_s": [], "decode_s": [], "e2e_s": [], "new_tokens": []}
    first_call_s = None
    set_speculation(runner, case.get("speculation"))
    peak.reset()
    for index in range(warmup + repetitions):
        started = time.perf_counter()
        output = runner.generate(batch, sampling)
        elapsed = time.perf_counter() - started
        if index == 0:
            first_call_s = elapsed
        if index >= warmup:
            samples["ttft_s"].append(output.ttft_s)
            samples["decode_s"].append(output.decode_s)
            samples["e2e_s"].append(elapsed)
            samples["new_tokens"].append(sum(len(sequence.token_ids) for sequence in output.sequences))
        on_rep(index)
    return {"id": case["id"], "samples": samples, "first_call_s": first_call_s, "peak_rss_bytes": peak.peak()}


def profile_case(runner, case: dict) -> dict:
    """One more greedy generation of the case under the runtime's profiler (not timed with the others)."""
    emit("profiling", case=case["id"])
    set_speculation(runner, None)
    if not callable(getattr(runner, "profile", None)):  # a peer runtime's runner
        return {"case": case["id"], "error": f"{type(runner).__name__} has no profiler"}
    try:
        return {"case": case["id"], **runner.profile(case["prompt_ids"], case["new_tokens"])}
    except Exception as exc:  # a runner without a profiler, or a profiler failure: the rows stand
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return {"case": case["id"], "error": message.splitlines()[0][:300]}


def run_plan(plan: dict) -> dict:
    from llmopt.benchmark.machine import PeakRss, current_rss, runtimes_loaded

    subject, threads = plan["subject"], plan["threads"]
    peak = PeakRss()
    if subject["kind"] == "artifact" and plan.get("verify", True):
        from llmopt import artifact

        artifact.load(subject["path"], verify=True)  # hashes every file; not part of the load time
    emit("loading")
    started = time.perf_counter()
    runner, threads_how = open_subject(subject, threads)
    open_s = time.perf_counter() - started
    # Fair timing: every case generates exactly its number of new tokens (end-of-sequence ignored).
    runner.eos_token_ids = set()
    if plan["cases"]:
        # Time to ready: some runners open lazily (openvino-genai builds its pipeline on the first call),
        # so loading ends with one single-token generation on the first case's prompts.
        from llmopt.runners.base import SamplingConfig

        runner.generate(plan["cases"][0]["prompt_ids"], SamplingConfig(max_new_tokens=1))
    load_s = time.perf_counter() - started
    result = {"load_s": load_s, "open_s": open_s, "rss_after_load_bytes": current_rss(),
              "load_peak_rss_bytes": peak.peak(), "rss_method": peak.method, "threads": threads,
              "threads_how": threads_how, "cases": []}
    emit("loaded", load_s=load_s)
    warmup = max(plan["warmup"], COMPILE_WARMUP) if subject.get("mode") == "compile" else plan["warmup"]
    for case in plan["cases"]:
        try:
            outcome = run_case(runner, case, warmup, plan["repetitions"], peak,
                               lambda index, case_id=case["id"]: emit("rep", case=case_id, index=index))
        except Exception as exc:  # one failing case (e.g. out of memory) does not lose the others
            outcome = {"id": case["id"], "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                       "traceback": traceback.format_exc(limit=6)}
        result["cases"].append(outcome)
    if plan.get("profile") and plan["cases"]:
        result["profile"] = profile_case(runner, plan["cases"][0])
    result["runtimes"] = runtimes_loaded()
    runner.close()
    peak.close()
    return result


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmopt.benchmark worker")
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    try:
        result = run_plan(plan)
    except Exception as exc:
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        result = {"error": message.splitlines()[0][:300] if message else type(exc).__name__,
                  "traceback": traceback.format_exc(limit=8)}
        args.result.write_text(json.dumps(result))
        return 1
    args.result.write_text(json.dumps(result))
    return 0
