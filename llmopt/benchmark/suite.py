"""Run a benchmark: each subject of its plan (``llmopt.benchmark.plan``) in its own worker process, then the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from llmopt import artifact, events
from llmopt.benchmark.machine import machine_info
from llmopt.hardware import default_threads
from llmopt.benchmark.plan import BenchConfig, Case, Subject, build_prompts, parse_baselines, plan_subjects
from llmopt.benchmark.stats import HIGH_VARIANCE, speedups, summarize
from llmopt.benchmark.worker import COMPILE_WARMUP, PROGRESS_PREFIX
from llmopt.errors import UsageError

__all__ = ["BenchConfig", "BenchResult", "parse_baselines", "plan_subjects", "run"]

MIB = 1024 * 1024


@dataclass
class BenchResult:
    rows: list[dict]
    machine: dict
    notes: list[str]

    @property
    def failed(self) -> bool:
        return any(row["status"] == "error" for row in self.rows)


def _worker_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(plan: dict, workdir: Path, on_event: Callable[[dict], None]) -> dict:
    """Run one subject in a fresh interpreter; returns its result (or {"error": ...})."""
    plan_path, result_path, log_path = workdir / "plan.json", workdir / "result.json", workdir / "worker.log"
    plan_path.write_text(json.dumps(plan))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "llmopt.benchmark", "worker", "--plan", str(plan_path), "--result", str(result_path)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=_worker_env())
        for line in process.stdout:
            if line.startswith(PROGRESS_PREFIX):
                on_event(json.loads(line[len(PROGRESS_PREFIX):]))
        code = process.wait()
    if result_path.is_file():
        return json.loads(result_path.read_text())
    tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return {"error": f"worker exited with code {code}" + (f": {tail[-1][:300]}" if tail else ""), "log_tail": tail}


def _base_row(subject: Subject, case: Case | None) -> dict:
    return {
        "subject": subject.name, "kind": subject.kind, "target": subject.target, "mode": subject.mode,
        "precision": subject.precision, "weights": subject.weights,
        "batch_size": case.batch_size if case else None, "input_length": case.input_length if case else None,
        "new_tokens": case.new_tokens if case else None, "prompt": case.prompt if case else None,
        "decoding": case.decoding if case else None,
    }


def _rows_for(subject: Subject, result: dict, size_bytes: int | None) -> list[dict]:
    rows = []
    for case, note in subject.skipped:
        rows.append({**_base_row(subject, case), "status": "skipped", "note": note})
    outcomes = {item["id"]: item for item in result.get("cases", [])}
    for index, case in enumerate(subject.cases):
        row = _base_row(subject, case)
        outcome = outcomes.get(index)
        if outcome is None or "error" in outcome:
            error = (outcome or {}).get("error") or result.get("error") or "not run"
            rows.append({**row, "status": "error", "note": error})
            continue
        samples = outcome["samples"]
        metrics, notes = summarize(samples, case.batch_size, case.input_length)
        generated = min(samples["new_tokens"])
        if generated < case.batch_size * case.new_tokens:
            notes.insert(0, f"generated {generated} of {case.batch_size * case.new_tokens} tokens: the runner stopped "
                            "early (end-of-sequence not ignored?); rates use the tokens generated")
        row.update(status="ok", **metrics)
        row.update(
            peak_rss_mib=round(outcome["peak_rss_bytes"] / MIB, 1),
            rss_after_load_mib=round(result["rss_after_load_bytes"] / MIB, 1),
            load_s=round(result["load_s"], 3), open_s=round(result["open_s"], 3),
            first_call_s=round(outcome["first_call_s"], 3),
            size_mib=round(size_bytes / MIB, 1) if size_bytes is not None else None,
            threads=result["threads"], threads_how=result["threads_how"], rss_method=result["rss_method"],
            runtimes=",".join(result.get("runtimes", [])),
            note="; ".join(notes) or None,
            samples={name: [round(value * 1000.0, 3) for value in values] if name.endswith("_s") else values
                     for name, values in samples.items()},
        )
        if index == result.get("profile", {}).get("case"):
            row["profile"] = {key: value for key, value in result["profile"].items() if key != "case"}
        rows.append(row)
    return rows


def _size_of(subject: Subject) -> int | None:
    path = Path(subject.path)
    if path.is_file():
        return path.stat().st_size
    if subject.kind == "artifact":
        return artifact.directory_size(path)
    weights = [file for pattern in ("*.safetensors", "*.bin", "*.pt") for file in path.glob(pattern)]
    return sum(file.stat().st_size for file in weights) or None


def add_comparisons(rows: list[dict], subjects: list[Subject]) -> None:
    """Each row's speedups against its reference: the eager baseline of its checkpoint (same case), or,
    for a speculative row, the same subject's greedy row on the same prompt."""
    by_name = {subject.name: subject for subject in subjects}
    eager_of = {s.checkpoint: s.name for s in subjects if s.kind == "pytorch" and s.mode == "eager"}
    index = {(row["subject"], row["batch_size"], row["input_length"], row["new_tokens"], row["prompt"], row["decoding"]): row
             for row in rows if row["status"] == "ok"}
    for row in rows:
        row.setdefault("vs", None)
        row.setdefault("decode_speedup", None)
        row.setdefault("ttft_speedup", None)
        if row["status"] != "ok":
            continue
        if row["decoding"] != "greedy":
            reference_name = row["subject"]
        else:
            reference_name = eager_of.get(by_name[row["subject"]].checkpoint)
            if reference_name == row["subject"]:
                continue
        key = (reference_name, row["batch_size"], row["input_length"], row["new_tokens"], row["prompt"], "greedy")
        reference = index.get(key)
        if reference is not None:
            row.update(vs=reference_name, **speedups(row, reference))


def run(config: BenchConfig, on_event: Callable[[dict], None] | None = None) -> BenchResult:
    """Plan, run every subject in its own process, and return the rows (one per measurement)."""
    if config.repetitions < 1:
        raise UsageError("--repetitions must be at least 1")
    if config.warmup < 0:
        raise UsageError("--warmup must be 0 or more")
    subjects, notes, grounded_budget = plan_subjects(config)
    if not any(subject.cases for subject in subjects):
        raise UsageError("nothing to run: no (batch size, input length) case fits any subject",
                         hint="check --batch-sizes against the artifacts' pinned batch sizes, and --input-lengths")
    prompt_ids, prompt_notes = build_prompts(config, subjects, grounded_budget)
    notes += prompt_notes
    threads = config.threads or default_threads()
    if "compile" in config.baselines and config.warmup < COMPILE_WARMUP:
        notes.append(f"pytorch:compile runs {COMPILE_WARMUP} untimed warmups per case (not {config.warmup}): "
                     "torch.compile recompiles once when the static cache is first filled")
    machine = machine_info()
    on_event = on_event or (lambda event: None)
    total = sum(len(s.cases) * (config.warmup + config.repetitions) for s in subjects)
    on_event({"event": "plan", "total": total, "subjects": [s.name for s in subjects if s.cases]})
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="llmopt-bench-") as tmp:
        for number, subject in enumerate(subjects):
            result: dict = {}
            if subject.cases:
                plan = {
                    "subject": {key: value for key, value in asdict(subject).items() if key not in ("cases", "skipped")},
                    "threads": threads, "warmup": config.warmup, "repetitions": config.repetitions,
                    "verify": config.verify, "profile": config.profile,
                    "cases": [{"id": index, **asdict(case),
                               "prompt_ids": prompt_ids[number][index]}
                              for index, case in enumerate(subject.cases)],
                }
                workdir = Path(tmp) / str(number)
                workdir.mkdir()
                events.info(f"benchmarking {subject.name} ({len(subject.cases)} cases) in a fresh process")
                result = run_worker(plan, workdir, lambda event, name=subject.name: on_event({**event, "subject": name}))
                if "error" in result:
                    events.warning(f"{subject.name}: {result['error']}")
            rows += _rows_for(subject, result, _size_of(subject) if subject.cases else None)
    add_comparisons(rows, subjects)
    noisy = [row for row in rows if row.get("high_variance")]
    if noisy:
        events.warning(f"{len(noisy)} of {len(rows)} measurements have high variance (p90/median above "
                       f"{HIGH_VARIANCE}): see their notes; a busy machine or too few repetitions")
    return BenchResult(rows=rows, machine=machine, notes=notes)
