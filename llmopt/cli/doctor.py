"""``llmopt doctor``: what this machine can build and run, and what is broken."""

from __future__ import annotations

import typer

from llmopt import doctor as doctor_module
from llmopt.cli import _output
from llmopt.cli.main import app
from llmopt.errors import LlmoptError


@app.command()
def doctor(json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout.")) -> None:
    """Installed targets and versions, what the others need, CPU/GPU/Neuron devices, known-bad versions.

    Exits 1 when an installed combination is known to break.
    """
    report = doctor_module.machine_report()
    if json_output:
        _output.print_json(report)
    else:
        _print_report(report)
    if report["problems"]:
        first, more = report["problems"][0], len(report["problems"]) - 1
        versions = ", ".join(f"{name} {version}" for name, version in first["packages"].items())
        raise LlmoptError(
            f"known-bad combination installed: {versions}: {first['why']}" + (f" (and {more} more above)" if more else ""),
            hint=first["fix"],
        )


def _print_report(report: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)
    console.print(f"llmopt {report['llmopt']}  python {report['python']}  {report['platform']}")
    if not report["metadata"]:
        console.print("llmopt's package metadata is missing, so the extras cannot be checked: pip install -e .")
    targets = Table("target", "status", "packages", box=box.SIMPLE, title="targets", title_justify="left")
    baseline = {p["name"] for t in report["targets"] if t["name"] == "pytorch" for p in t["packages"]}
    for target in report["targets"]:
        if target["installed"]:
            status = "[green]installed[/green]"
            shown = [p for p in target["packages"] if target["name"] == "pytorch" or p["name"] not in baseline]
            detail = ", ".join(f"{p['name']} {p['version']}" for p in shown)
        else:
            status = "[yellow]missing[/yellow]" if target["missing"] else "[red]wrong version[/red]"
            detail = "; ".join(
                ([f"missing {', '.join(target['missing'])}"] if target["missing"] else [])
                + ([f"wrong {', '.join(target['mismatched'])}"] if target["mismatched"] else [])
                + [f"install: {target['install']}"]
            )
        targets.add_row(target["name"], status, escape(detail))
    console.print(targets)
    console.print(f"[bold]architectures[/bold] {', '.join(report['architectures'])}")

    cpu = report["cpu"]
    memory = f"{cpu['memory_bytes'] / 2**30:.0f} GiB" if cpu["memory_bytes"] else "? GiB"
    console.print(f"[bold]cpu[/bold]     {cpu['model']} ({cpu['machine']}), {cpu['physical_cores']} cores, "
                  f"{cpu['logical_cores']} threads ({cpu['usable_cores']} usable), {memory}")
    console.print(f"[bold]flags[/bold]   {' '.join(cpu['flags']) or 'none of the vector extensions llmopt looks for'}")
    gpus = report["gpus"]
    if isinstance(gpus, str):
        console.print(f"[bold]gpus[/bold]    {escape(gpus)}")
    else:
        lines = [f"{g.get('name')} ({g.get('memory.total')}, driver {g.get('driver_version')}, "
                 f"compute {g.get('compute_cap')})" for g in gpus]
        console.print(f"[bold]gpus[/bold]    {escape('; '.join(lines)) or 'none (no nvidia-smi)'}")
    console.print(f"[bold]neuron[/bold]  {', '.join(report['neuron_devices']) or 'no /dev/neuron* devices'}")
    if not report["problems"]:
        console.print("[bold]problems[/bold] no known-bad version combination installed")
    for problem in report["problems"]:
        versions = ", ".join(f"{name} {version}" for name, version in problem["packages"].items())
        console.print(f"[bold red]problem[/bold red] {escape(versions)}: {escape(problem['why'])}; fix: {escape(problem['fix'])}")
