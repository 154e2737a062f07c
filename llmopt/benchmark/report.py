"""Bench rows as a rich table, JSON lines, CSV, Markdown, and a plot.

JSON rows carry every column plus the raw samples and the machine; CSV and Markdown carry the
flat ``COLUMNS`` (the same rows, in the same order).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

FORMATS = ("table", "json", "csv", "md")

COLUMNS = (
    "subject", "kind", "target", "mode", "precision", "weights", "batch_size", "input_length", "new_tokens",
    "prompt", "decoding", "status", "reps", "total_tokens",
    "ttft_ms", "ttft_ms_p90", "ttft_ms_p99", "tpot_ms", "tpot_ms_p90", "tpot_ms_p99",
    "e2e_ms", "e2e_ms_p90", "e2e_ms_p99", "decode_tok_s", "throughput_tok_s",
    "peak_rss_mib", "rss_after_load_mib", "load_s", "open_s", "first_call_s", "size_mib", "threads",
    "vs", "decode_speedup", "ttft_speedup", "high_variance", "note",
)

# (header, column, format) of the terminal tables: speed (one row per measurement) and resources
# (one row per subject); the full set of columns is in the json, csv and md outputs.
SPEED = (
    ("bs", "batch_size", "{}"), ("in", "input_length", "{}"), ("new", "new_tokens", "{}"),
    ("TTFT", "ttft_ms", None), ("TPOT", "tpot_ms", None), ("dec/s", "decode_tok_s", None),
    ("tok/s", "throughput_tok_s", None), ("e2e", "e2e_ms", None), ("x dec", "decode_speedup", None),
    ("x TTFT", "ttft_speedup", None),
)
RESOURCES = (
    ("target", "target", "{}"), ("dtype", "precision", "{}"), ("weights", "weights", "{}"),
    ("size MiB", "size_mib", None), ("load s", "load_s", None), ("RSS MiB", "peak_rss_mib", None),
    ("thr", "threads", "{}"),
)


def compact(value: float) -> str:
    """Three significant digits or so, so that the table fits a terminal."""
    magnitude = abs(value)
    if magnitude >= 100_000:
        return f"{value / 1000:.0f}k"
    if magnitude >= 10_000:
        return f"{value / 1000:.1f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def flat(row: dict) -> dict:
    return {column: row.get(column) for column in COLUMNS}


def machine_line(machine: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items())
    return (f"{machine.get('cpu')} ({machine.get('physical_cores')} cores, {machine.get('usable_cpus')} usable CPUs, "
            f"{(machine.get('memory_bytes') or 0) / 2**30:.0f} GiB); {versions}")


def to_json_lines(rows: list[dict], machine: dict) -> str:
    return "".join(json.dumps({**flat(row), "runtimes": row.get("runtimes"), "threads_how": row.get("threads_how"),
                               "rss_method": row.get("rss_method"), "samples": row.get("samples"),
                               **({"profile": row["profile"]} if row.get("profile") else {}),
                               "machine": machine}, default=str) + "\n" for row in rows)


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in flat(row).items()})
    return buffer.getvalue()


def _md_cell(value) -> str:
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[dict], machine: dict | None = None) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(value) for value in flat(row).values()) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    if machine:
        text += f"\nMachine: {machine_line(machine)}\n"
    return text


def render(rows: list[dict], machine: dict, fmt: str) -> str:
    if fmt == "json":
        return to_json_lines(rows, machine)
    if fmt == "csv":
        return to_csv(rows)
    if fmt == "md":
        return to_markdown(rows, machine)
    raise ValueError(f"unknown format '{fmt}'")


def _cell(row: dict, column: str, pattern: str | None) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    try:
        return compact(value) if pattern is None else pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def _label(row: dict) -> str:
    label = short_name(row["subject"])
    if row.get("decoding") not in (None, "greedy"):
        label += " " + row["decoding"].replace("prompt-lookup:", "lookup:")
    if row.get("prompt") == "grounded":
        label += " [sum]"
    return label


def _columns(spec, rows: list[dict]):
    """Leave out the columns that say nothing here: all empty, or (batch size) all the same."""
    kept, same = [], []
    for header, column, pattern in spec:
        values = {row.get(column) for row in rows}
        if values == {None}:
            continue
        if column == "batch_size" and len(values) == 1:
            same.append(f"batch size {values.pop()}")
            continue
        kept.append((header, column, pattern))
    return kept, same


def print_table(rows: list[dict], machine: dict, notes: list[str], console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:  # piped: no need to squeeze into 80 columns
        console = Console() if sys.stdout.isatty() else Console(width=200)
    ok = [row for row in rows if row["status"] == "ok"]
    footnotes = list(notes)
    footnotes += [f"{row['subject']} bs={row.get('batch_size')}: {row['status']}: {row.get('note')}"
                  for row in rows if row["status"] != "ok"]
    columns, same = _columns(SPEED, ok)
    title = "medians: TTFT, TPOT, e2e in ms; dec/s, tok/s in tokens/s" + "".join(f"; {item}" for item in same)
    speed = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
    speed.add_column("subject", overflow="fold", min_width=12)
    for header, _, _ in columns:
        speed.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    for row in ok:
        cells = [_cell(row, column, pattern) for _, column, pattern in columns]
        if row.get("high_variance"):
            cells[-1] += "*"
        speed.add_row(Text(_label(row)), *cells)  # Text: a label is not rich markup
        if row.get("note"):
            footnotes.append(f"{_label(row)} bs={row['batch_size']} in={row['input_length']}: {row['note']}")
    console.print(speed)

    by_subject: dict[str, dict] = {}
    for row in ok:
        seen = by_subject.setdefault(row["subject"], dict(row))
        seen["peak_rss_mib"] = max(seen["peak_rss_mib"], row["peak_rss_mib"])
    columns, _ = _columns(RESOURCES, list(by_subject.values()))
    resources = Table(title="resources (RSS MiB: peak of the largest case)", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                      padding=(0, 1))
    resources.add_column("subject", overflow="fold", min_width=12)
    for header, _, _ in columns:
        resources.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    for name, row in by_subject.items():
        resources.add_row(Text(short_name(name)), *[_cell(row, column, pattern) for _, column, pattern in columns])
    console.print(resources)
    console.print(f"machine: {machine_line(machine)}", markup=False, highlight=False)
    if any(row.get("vs") for row in ok):
        console.print("x dec: decode tokens/s over the reference's; x TTFT: the reference's TTFT over this one "
                      "(above 1 is faster). Reference: the eager PyTorch baseline at the same case, or, for speculative "
                      "rows (lookup, draft), the same subject's greedy row on the same prompt.", markup=False, highlight=False)
    if any(row.get("high_variance") for row in ok):
        console.print("*: high variance (p90/median above 1.2), see the notes", markup=False, highlight=False)
    for note in footnotes:
        console.print(f"note: {note}", markup=False, highlight=False)


def write_all(rows: list[dict], machine: dict, directory: str | Path) -> list[Path]:
    """bench.jsonl, bench.csv, bench.md and bench.png in ``directory``: every output of one run."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, name in (("json", "bench.jsonl"), ("csv", "bench.csv"), ("md", "bench.md")):
        path = directory / name
        path.write_text(render(rows, machine, fmt), encoding="utf-8")
        written.append(path)
    written.append(plot(rows, directory / "bench.png"))
    return written


def short_name(subject: str) -> str:
    """An artifact's directory name instead of its full path (JSON, CSV and Markdown keep the path)."""
    return Path(subject).name if "/" in subject or "\\" in subject else subject


def plot(rows: list[dict], path: str | Path) -> Path:
    """TTFT and throughput against input length: one colour per subject, one line style per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if row["status"] == "ok" and row["prompt"] == "synthetic":
            series.setdefault((row["subject"], row["batch_size"]), []).append(row)
    subjects = list(dict.fromkeys(subject for subject, _ in series))
    palette = plt.get_cmap("tab10" if len(subjects) <= 10 else "tab20")
    styles = {batch: style for batch, style in zip(sorted({batch for _, batch in series}), ("-", "--", ":", "-."))}
    figure, (ttft_axis, rate_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    for (subject, batch), points in series.items():
        points = sorted(points, key=lambda row: row["input_length"])
        lengths = [row["input_length"] for row in points]
        style = dict(marker="o", color=palette(subjects.index(subject) % palette.N), linestyle=styles.get(batch, "-"),
                     label=f"{short_name(subject)} bs={batch}")
        ttft_axis.plot(lengths, [row["ttft_ms"] for row in points], **style)
        rate_axis.plot(lengths, [row["throughput_tok_s"] for row in points], **style)
    ttft_axis.set(title="Time to first token (lower is better)", xlabel="input tokens", ylabel="ms")
    rate_axis.set(title="Throughput: (input + output) tokens / end-to-end", xlabel="input tokens", ylabel="tokens/s")
    for axis in (ttft_axis, rate_axis):
        axis.grid(True, alpha=0.3)
        values = [value for line in axis.get_lines() for value in line.get_ydata() if value and value > 0]
        if values and max(values) / min(values) > 20:  # runtimes often differ by orders of magnitude
            axis.set_yscale("log")
    if series:
        figure.legend(*ttft_axis.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def print_profiles(rows: list[dict], console=None) -> None:
    """``--profile``: per subject, where a decode step and the prefill spend their time (ms), by layer role and
    by operator type; host = the measured time (TPOT, TTFT medians) minus the runtime's operator time."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from llmopt.profiling import ROLES

    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=200)
    profiled = [row for row in rows if row.get("profile")]
    table = Table(title="where the time goes (ms; decode per token, prefill per prompt)", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, padding=(0, 1))
    for header in ("subject", "phase", "measured", "operators", *ROLES, "host", "top operator types"):
        table.add_column(header, justify="left" if header in ("subject", "phase", "top operator types") else "right")
    for row in profiled:
        profile = row["profile"]
        if "error" in profile:
            console.print(f"note: {short_name(row['subject'])}: no profile: {profile['error']}", markup=False,
                          highlight=False)
            continue
        for phase, measured in (("decode", row.get("tpot_ms")), ("prefill", row.get("ttft_ms"))):
            part = profile[phase]
            measured = measured if measured is not None else part["wall_ms"]
            top = ", ".join(f"{name} {ms:.2f}" for name, ms in list(part["by_op_type"].items())[:3])
            table.add_row(Text(short_name(row["subject"])), phase, f"{measured:.2f}", f"{part['operator_ms']:.2f}",
                          *[f"{part['by_role'].get(role, 0.0):.2f}" for role in ROLES],
                          f"{max(measured - part['operator_ms'], 0.0):.2f}", Text(top))
    if profiled:
        console.print(table)
        notes = {row["profile"].get("note") for row in profiled if row["profile"].get("note")}
        for note in sorted(notes):
            console.print(f"note: {note}", markup=False, highlight=False)
