"""``llmopt bench``: artifacts and the PyTorch baseline side by side (latency, throughput, memory)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from llmopt.cli.main import app
from llmopt.errors import EXIT_RUNTIME, UsageError


def _numbers(text: Optional[str], kind, flag: str) -> Optional[list]:
    if text is None:
        return None
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise UsageError(f"{flag}: expected comma-separated numbers, got '{text}'") from exc
    if not values or any(value <= 0 for value in values):
        raise UsageError(f"{flag}: expected positive numbers, got '{text}'")
    return values


def _format_for(fmt: Optional[str], json_output: bool, output: Optional[Path]) -> Optional[str]:
    from llmopt.benchmark.report import FORMATS

    if json_output:
        if fmt not in (None, "json"):
            raise UsageError("--json and --format disagree; give one of them")
        return "json"
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format '{fmt}' is not one of: {', '.join(FORMATS)}")
    if output is not None:
        if fmt == "table":
            raise UsageError("--output takes json, csv or md; the table always goes to stdout")
        if fmt is None:
            return {".json": "json", ".jsonl": "json", ".csv": "csv", ".md": "md"}.get(output.suffix.lower(), "json")
    return fmt


class _Progress:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=True)
            self.task = None

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        if not self.bar:
            return
        if event["event"] == "plan":
            self.task = self.bar.add_task("planning", total=event["total"])
        elif event["event"] in ("loading", "loaded"):
            self.bar.update(self.task, description=f"{event['subject']}: {event['event']}")
        elif event["event"] == "rep":
            self.bar.update(self.task, advance=1, description=f"{event['subject']}: case {event['case'] + 1}")


@app.command()
def bench(
    artifacts: list[Path] = typer.Argument(None, help="Artifact directories (each runs in its own process)."),
    baseline: list[str] = typer.Option([], "--baseline", help="pytorch (eager), pytorch:all (eager, static and "
                                       "compile), pytorch:static, pytorch:compile, pytorch:eager,static, or none. "
                                       "Repeatable."),
    baseline_model: Optional[str] = typer.Option(None, "--baseline-model", help="Checkpoint for the baseline "
                                                 "(default: each artifact's source checkpoint)."),
    baseline_dtype: str = typer.Option("fp32", "--baseline-dtype", help="fp32, fp16 or bf16."),
    sweep: bool = typer.Option(False, "--sweep", help="Input lengths at 25, 50 and 75 %% of each sequence_length, "
                               "the rest of the sequence generated (default: one 128-token prompt, 128 new tokens)."),
    input_ratios: Optional[str] = typer.Option(None, "--input-ratios", help="Input lengths as fractions of each "
                                               "artifact's sequence_length; the rest of the sequence is generated."),
    input_lengths: Optional[str] = typer.Option(None, "--input-lengths", help="Absolute input lengths (replace --input-ratios)."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", min=2, help="Cap on generated tokens (default: "
                                             "128 for the default case, up to the sequence length for a sweep)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Batch sizes; an artifact runs only its "
                                              "pinned one (others are skipped with a note). Default: the artifacts' own."),
    sequence_length: Optional[int] = typer.Option(None, "--sequence-length", min=8, help="Baseline-only runs: the "
                                                  "sequence length the input ratios apply to (default 512)."),
    repetitions: int = typer.Option(5, "--repetitions", "-r", min=1, help="Timed runs per case, after warmup."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed runs per case."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic prompts."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for torch and for runners that take a threads option (default: all physical cores; ONNX Runtime and OpenVINO use all physical cores by default)."),
    prompt_lookup: int = typer.Option(0, "--prompt-lookup", min=0, help="Also measure prompt-lookup decoding with N "
                                      "candidate tokens on a summarization prompt, against plain greedy."),
    draft: list[Path] = typer.Option([], "--draft", help="Also measure assisted generation with this draft model on "
                                      "the summarization prompt: an artifact of the same target (e.g. the int4 build) "
                                      "for artifacts, a checkpoint for the PyTorch baseline. Repeatable."),
    draft_tokens: int = typer.Option(5, "--draft-tokens", min=1, help="Candidate tokens per step with --draft."),
    fmt: Optional[str] = typer.Option(None, "--format", help="table (default), json, csv or md."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per measurement (same as --format json)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the --format output here (stdout still "
                                          "gets the table)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: TTFT and throughput against input length."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Write every output there: bench.jsonl, "
                                              "bench.csv, bench.md and bench.png (the table still goes to stdout)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Re-hash artifact files before loading (not timed)."),
    profile: bool = typer.Option(False, "--profile", help="Where the time goes: one more run of each subject's first "
                                 "case under its runtime's profiler (onnxruntime session profiling, OpenVINO "
                                 "performance counters), per operator type and per layer role."),
) -> None:
    """Latency, throughput and memory of artifacts and the PyTorch baseline, side by side, in one run."""
    from llmopt import api
    from llmopt.benchmark import BenchConfig, parse_baselines, report
    from llmopt.benchmark.plan import SWEEP_RATIOS

    chosen = _format_for(fmt, json_output, output)
    if baseline_dtype not in ("fp32", "fp16", "bf16"):
        raise UsageError(f"--baseline-dtype '{baseline_dtype}' is not one of: fp32, fp16, bf16")
    config = BenchConfig(
        artifacts=[str(path) for path in artifacts or []], baselines=parse_baselines(baseline),
        baseline_model=baseline_model, baseline_dtype=baseline_dtype,
        input_ratios=_numbers(input_ratios, float, "--input-ratios") or (list(SWEEP_RATIOS) if sweep else None),
        input_lengths=_numbers(input_lengths, int, "--input-lengths"), new_tokens=new_tokens,
        batch_sizes=_numbers(batch_sizes, int, "--batch-sizes"), sequence_length=sequence_length,
        repetitions=repetitions, warmup=warmup, seed=seed, threads=threads, prompt_lookup=prompt_lookup,
        drafts=[str(path) for path in draft], draft_tokens=draft_tokens, verify=verify, profile=profile,
    )
    if not config.artifacts and not config.baselines:
        raise UsageError("nothing to benchmark: give artifact directories and/or --baseline pytorch")
    if any(ratio >= 1 for ratio in config.input_ratios or []):
        raise UsageError("--input-ratios must be below 1 (the rest of the sequence is generated)")
    with _Progress(sys.stderr.isatty()) as progress:
        result = api.bench(config, on_event=progress)

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report.render(result.rows, result.machine, chosen or "json"), encoding="utf-8")
    if chosen in (None, "table") or output is not None:
        report.print_table(result.rows, result.machine, result.notes)
        if profile:
            report.print_profiles(result.rows)
    else:
        sys.stdout.write(report.render(result.rows, result.machine, chosen))
        sys.stdout.flush()
        for note in result.notes:
            sys.stderr.write(f"note: {note}\n")
    if plot is not None:
        report.plot(result.rows, plot)
    if output_dir is not None:
        for path in report.write_all(result.rows, result.machine, output_dir):
            sys.stderr.write(f"wrote {path}\n")
    if result.failed:
        failed = sorted({row["subject"] for row in result.rows if row["status"] == "error"})
        sys.stderr.write(f"error: some measurements failed ({', '.join(failed)}); see the rows' notes\n")
        raise typer.Exit(EXIT_RUNTIME)
