"""The verbs as plain functions: what the CLI, CI scripts and tests call.

Nothing here prints; progress goes through ``llmopt.events`` and results are returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt import artifact, events, generation, sources, validation
from llmopt._deps import version_of
from llmopt.artifact import Manifest
from llmopt.errors import ValidationFailed
from llmopt.exporters.base import Exporter, copy_tokenizer_files
from llmopt.recipe import Recipe
from llmopt.registry import exporter_class, runner_class
from llmopt.runners.base import Runner, SamplingConfig


@dataclass
class ExportReport:
    output: Path
    manifest: Manifest
    seconds: float
    size_bytes: int
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "target": self.manifest.target,
            "seconds": round(self.seconds, 3),
            "size_bytes": self.size_bytes,
            "shapes": self.manifest.shapes,
            "precision": self.manifest.precision,
            "quantization": self.manifest.quantization,
            "validation": self.manifest.validation,
        }


def make_exporter(recipe: Recipe) -> Exporter:
    exporter = exporter_class(recipe.target)()
    exporter.check(recipe)
    return exporter


def plan(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe and the exact backend arguments, without importing any backend."""
    exporter = make_exporter(recipe)
    return {"target": recipe.target, "recipe": recipe.to_dict(), "plan": exporter.plan(recipe)}


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def new_manifest(recipe: Recipe, exporter: Exporter, checkpoint: Path, result) -> Manifest:
    return Manifest(
        target=recipe.target,
        recipe=recipe.to_dict(),
        source={"model": recipe.model.id, "revision": recipe.model.revision, "checkpoint": str(checkpoint)},
        backend_versions={name: version_of(name) for name in exporter.backend_distributions},
        shapes=recipe.shapes.model_dump(),
        precision=recipe.precision.dtype,
        quantization=recipe.quantization.model_dump(mode="json"),
        io=result.io,
        runtime=result.runtime,
        **result.extra,
    )


def validate_against_pytorch(recipe: Recipe, checkpoint: Path, workdir: Path, manifest: Manifest) -> dict[str, Any]:
    """Teacher-forced comparison of the artifact in ``workdir`` with PyTorch fp32 on the checkpoint."""
    from llmopt.runners.pytorch import PyTorchRunner

    reference = PyTorchRunner.from_checkpoint(checkpoint, threads=1)
    limit = min(recipe.validation.max_tokens, recipe.shapes.sequence_length)
    token_ids = validation.validation_ids(reference.tokenizer, limit)
    reference_logits = reference.logits(token_ids)
    reference.close()
    candidate = runner_class(recipe.target, manifest.static)(workdir, manifest.batch_size, manifest.sequence_length, manifest=manifest)
    try:
        metrics = validation.compare(reference_logits, candidate.logits(token_ids), token_ids)
    finally:
        candidate.close()
    thresholds = recipe.validation
    metrics["passed"] = bool(
        metrics["top1_agreement"] >= thresholds.min_top1_agreement and metrics["mean_kl"] <= thresholds.max_mean_kl
    )
    metrics["thresholds"] = {"min_top1_agreement": thresholds.min_top1_agreement, "max_mean_kl": thresholds.max_mean_kl}
    return metrics


def export(recipe: Recipe, output: str | Path, force: bool = False, validate: bool = True) -> ExportReport:
    """Build an artifact at ``output``; on any failure ``output`` is left as it was."""
    started = time.perf_counter()
    output = Path(output)
    exporter = make_exporter(recipe)
    artifact.check_output_free(output, force)
    exporter.preflight(recipe)
    with events.step("resolve", f"resolving model {recipe.model.id}"):
        checkpoint = sources.resolve_model(recipe.model.id, recipe.model.revision, recipe.model.trust_remote_code)
        sources.check_architecture(checkpoint)
    with artifact.staging(output, force) as workdir:
        with events.step("export", f"exporting to {recipe.target}"):
            result = exporter.export(recipe, checkpoint, workdir)
            copy_tokenizer_files(checkpoint, workdir)
        manifest = new_manifest(recipe, exporter, checkpoint, result)
        if validate and recipe.validation.enabled and exporter.runs_on_host:
            with events.step("validate", "comparing with PyTorch (teacher-forced)") as fields:
                manifest.validation = validate_against_pytorch(recipe, checkpoint, workdir, manifest)
                fields.update(manifest.validation)
            if not manifest.validation["passed"]:
                metrics = manifest.validation
                raise ValidationFailed(
                    f"validation failed: top-1 agreement {metrics['top1_agreement']:.3f} "
                    f"(min {recipe.validation.min_top1_agreement}), mean KL {metrics['mean_kl']:.4f} "
                    f"(max {recipe.validation.max_mean_kl}); no artifact written",
                    hint="loosen validation.* in the recipe, or pass --no-validate",
                )
        with events.step("write", f"writing {output}"):
            artifact.finalize(workdir, manifest)
            size = directory_size(workdir)
    return ExportReport(output=output, manifest=manifest, seconds=time.perf_counter() - started, size_bytes=size)


def open_runner(path: str | Path, verify: bool = True, **options) -> Runner:
    """Load an artifact with the runner its manifest names."""
    manifest = artifact.read_manifest(Path(path))
    return runner_class(manifest.target, manifest.static).load(path, verify=verify, **options)


def sampling_from(manifest: Manifest | None, **overrides: Any) -> SamplingConfig:
    """The artifact's recipe generation defaults, with the non-None overrides applied."""
    defaults = dict((manifest.recipe.get("generation") or {}) if manifest else {})
    defaults.update({key: value for key, value in overrides.items() if value is not None})
    known = SamplingConfig.__dataclass_fields__
    return SamplingConfig(**{key: value for key, value in defaults.items() if key in known})


def run(path: str | Path, prompts: list[str], chat: bool = True, on_text=None, **sampling_overrides: Any):
    """Load an artifact and generate for each prompt; returns a list of GenerationResult."""
    with events.step("load", f"loading {path}"):
        runner = open_runner(path)
    try:
        sampling = sampling_from(runner.manifest, **sampling_overrides)
        return generation.generate(runner, prompts, sampling, chat=chat, on_text=on_text)
    finally:
        runner.close()
