"""``llmopt quantize``: int8/int4 weights from a checkpoint (the export flags) or from an fp artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from llmopt import api, cache
from llmopt.cli import _common, _output
from llmopt.cli.main import app
from llmopt.errors import UsageError
from llmopt.recipe import parse_set_options


def quantization_overrides(**flags: Any) -> dict[str, Any]:
    """The quantization flags as dotted recipe paths (None: not given)."""
    return {f"quantization.{name}": value for name, value in flags.items()}


@app.command()
def quantize(
    source: Optional[str] = typer.Argument(None, help="An fp artifact directory to quantize (keeps its shapes); or use -m."),
    model: Optional[str] = _common.ModelOption,
    adapter: Optional[str] = _common.AdapterOption,
    target: Optional[str] = _common.TargetOption,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact directory to create."),
    config: Optional[Path] = _common.ConfigOption,
    set_items: list[str] = _common.SetOption,
    batch_size: Optional[int] = _common.BatchSizeOption,
    sequence_length: Optional[int] = _common.SequenceLengthOption,
    weight_format: Optional[str] = typer.Option(None, "--weight-format", help="int8 or int4 (fp8 where the target has it)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="int4 weights per scale; -1 per channel. Default: the largest that divides."),
    symmetric: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric (no zero point) or asymmetric weights."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Share of layers in int4, the rest int8."),
    awq: Optional[bool] = typer.Option(None, "--awq/--no-awq", help="AWQ (int4; on by default with --algorithm auto)."),
    scale_estimation: Optional[bool] = typer.Option(None, "--scale-estimation/--no-scale-estimation", help="Scale estimation (int4; on by default with --algorithm auto)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Calibration text: default, chat, pydoc, or a local .txt/.jsonl file."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Calibration samples."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help="auto, rtn (data-free), awq or gptq."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="Key/value cache precision: auto, u8, fp16 or fp32."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact (atomically)."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the accuracy check against the fp reference."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the plan; build nothing."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
    no_cache: bool = typer.Option(False, "--no-cache", help="From a model: always compile; neither read nor fill the cache."),
    cache_repo: Optional[str] = _common.CacheRepoOption,
) -> None:
    """Quantize weights to int8 or int4, then measure the accuracy against the fp reference."""
    # Named flags, then the quantization flags, then --set items: the most specific wins.
    overrides = {
        **_common.flag_overrides(model=model, target=target, batch_size=batch_size, sequence_length=sequence_length,
                                 adapter=adapter),
        **quantization_overrides(
            weight_format=weight_format, group_size=group_size, symmetric=symmetric, ratio=ratio, awq=awq,
            scale_estimation=scale_estimation, dataset=dataset, num_samples=num_samples, algorithm=algorithm,
            kv_cache=kv_cache,
        ),
        **parse_set_options(set_items),
    }
    if dry_run:
        plan = api.quantize_plan(source, config=config, overrides=overrides)
        if json_output:
            _output.print_json(plan)
        else:
            typer.echo(yaml.safe_dump(plan, sort_keys=False), nl=False)
        return
    if output is None:
        raise UsageError("-o/--output is required (the artifact directory to create)")
    report = api.quantize(output, source=source, config=config, overrides=overrides, force=force,
                          validate=not no_validate, cache_dir=None if no_cache else cache.default_dir(),
                          cache_repo=cache_repo)
    if json_output:
        _output.print_json(report.to_dict())
        return
    typer.echo(summary_line(report))


def summary_line(report: api.ExportReport) -> str:
    manifest = report.manifest
    line = (f"{report.output}  target={manifest.target}  {manifest.quantization.get('weight_format')}  "
            f"{report.size_bytes / 1e6:.1f} MB  {report.seconds:.1f}s")
    line += "  (from cache)" if report.cached else ""
    metrics = manifest.validation
    if metrics:
        line += (f"  top1={metrics['top1_agreement']:.3f}  kl={metrics['mean_kl']:.4f}  "
                 f"ppl={metrics['perplexity']:.2f} (fp {metrics['reference_perplexity']:.2f})")
    return line
