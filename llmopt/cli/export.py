"""``llmopt export``: recipe + flags -> a static-shape artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from llmopt import api, cache
from llmopt.cli import _common, _output
from llmopt.cli.main import app
from llmopt.errors import UsageError


@app.command()
def export(
    model: Optional[str] = _common.ModelOption,
    adapter: Optional[str] = _common.AdapterOption,
    target: Optional[str] = _common.TargetOption,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact directory to create."),
    config: Optional[Path] = _common.ConfigOption,
    set_items: list[str] = _common.SetOption,
    batch_size: Optional[int] = _common.BatchSizeOption,
    sequence_length: Optional[int] = _common.SequenceLengthOption,
    dtype: Optional[str] = _common.DtypeOption,
    static: Optional[bool] = _common.StaticOption,
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact (atomically)."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the parity check against PyTorch."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the plan; build nothing."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Compile cache (default $LLMOPT_CACHE_DIR/artifacts or ~/.cache/llmopt/artifacts)."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Always compile; neither read nor fill the cache."),
    cache_repo: Optional[str] = _common.CacheRepoOption,
) -> None:
    """Export a checkpoint to a static-shape artifact for one target."""
    recipe = _common.resolve_recipe(config, set_items, model=model, target=target, batch_size=batch_size,
                                    sequence_length=sequence_length, dtype=dtype, static=static,
                                    adapter=adapter)
    if dry_run:
        plan = api.plan(recipe)
        if json_output:
            _output.print_json(plan)
        else:
            typer.echo(yaml.safe_dump(plan, sort_keys=False), nl=False)
        return
    if output is None:
        raise UsageError("-o/--output is required (the artifact directory to create)")
    cache_dir = None if no_cache else (cache_dir or cache.default_dir())
    report = api.export(recipe, output, force=force, validate=not no_validate, cache_dir=cache_dir, cache_repo=cache_repo)
    if json_output:
        _output.print_json(report.to_dict())
        return
    line = f"{report.output}  target={report.manifest.target}  {report.size_bytes / 1e6:.1f} MB  {report.seconds:.1f}s"
    line += "  (from cache)" if report.cached else ""
    if report.manifest.validation:
        metrics = report.manifest.validation
        line += f"  top1={metrics['top1_agreement']:.3f}  kl={metrics['mean_kl']:.4f}"
    typer.echo(line)
