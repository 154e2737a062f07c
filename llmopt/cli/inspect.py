"""``llmopt verify`` (will this artifact load here?) and ``llmopt inspect`` (what is in it?)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml

from llmopt import artifact, doctor
from llmopt.cli import _output
from llmopt.cli.main import app
from llmopt.errors import LlmoptError


@app.command()
def verify(
    path: Path = typer.Argument(..., help="Artifact directory."),
    run: bool = typer.Option(False, "--run", help="Also load it and generate a few tokens."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Re-hash every file against the manifest and check this machine's backends can load it."""
    try:
        result = doctor.check_artifact(path, run=run)
    except LlmoptError as exc:
        if not json_output:
            raise
        _output.print_json({"ok": False, "path": str(path), "error": exc.message, "hint": exc.hint})
        raise  # the CLI prints the one-line error and exits 1
    if json_output:
        _output.print_json({"ok": True, **result})
        return
    line = f"ok: {result['path']}  target={result['target']}  {result['files_verified']} files verified"
    versions = ", ".join(f"{name} {v['installed']}" for name, v in result["backend_versions"].items())
    line += f"  backends: {versions or 'none recorded'}"
    if "generated" in result:
        line += f"  generated {result['generated']['tokens']} tokens"
    typer.echo(line)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Artifact directory."),
    json_output: bool = typer.Option(False, "--json", help="The manifest as stored, on stdout."),
) -> None:
    """Show an artifact's manifest: source, recipe, shapes, versions, validation, files."""
    manifest = artifact.read_manifest(path)  # checks the format version; does not re-hash (see verify)
    if json_output:
        _output.print_json(json.loads((path / artifact.MANIFEST_NAME).read_text(encoding="utf-8")))
        return
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)
    summary = Table(box=box.SIMPLE, show_header=False, title=escape(str(path)), title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    source = manifest.source or {}
    rows = {
        "target": manifest.target,
        "model": f"{source.get('model')}" + (f" @ {source['revision']}" if source.get("revision") else ""),
        "shapes": ", ".join(f"{key}={value}" for key, value in manifest.shapes.items()),
        "precision": manifest.precision,
        "quantization": manifest.quantization.get("weight_format", "none") if manifest.quantization else "none",
        "validation": _validation_line(manifest.validation),
        "llmopt": f"{manifest.llmopt_version} (format {manifest.format_version})",
        "backends": ", ".join(f"{name} {version}" for name, version in manifest.backend_versions.items()) or "-",
        "created": manifest.created_at,
        "cache key": manifest.cache_key or "-",
        "size": f"{sum(_size(path / name) for name in manifest.files) / 1e6:.1f} MB in {len(manifest.files)} files",
    }
    for key, value in rows.items():
        summary.add_row(key, escape(str(value)))
    console.print(summary)
    for section in ("io", "runtime"):
        if getattr(manifest, section):
            console.print(f"[bold]{section}[/bold]")
            console.print(yaml.safe_dump(getattr(manifest, section), sort_keys=False).rstrip(), markup=False)
    console.print("[bold]recipe[/bold]")
    console.print(yaml.safe_dump(manifest.recipe, sort_keys=False).rstrip(), markup=False)
    files = Table("file", "size", "sha256", box=box.SIMPLE, title="files", title_justify="left")
    for name, digest in manifest.files.items():
        files.add_row(escape(name), f"{_size(path / name):,}", digest[:16])
    console.print(files)


def _validation_line(metrics: dict | None) -> str:
    if not metrics:
        return "not run"
    state = "passed" if metrics.get("passed") else "FAILED"
    return (f"{state}: top-1 agreement {metrics.get('top1_agreement', 0):.3f}, "
            f"mean KL {metrics.get('mean_kl', 0):.4f} over {metrics.get('tokens')} tokens")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0
