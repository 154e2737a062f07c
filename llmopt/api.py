"""The verbs as plain functions: what the CLI, CI scripts and tests call.

Nothing here prints; progress goes through ``llmopt.events`` and results are returned.
"""

from __future__ import annotations

import contextlib
import errno
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmopt import adapters, artifact, cache, events, generation, hub, hub_cache, memory, sources, validation
from llmopt import quantize as quantization
from llmopt import recipe as recipe_module
from llmopt._deps import version_of
from llmopt.artifact import Manifest, directory_size
from llmopt.errors import LlmoptError, UsageError, ValidationFailed, backend_errors
from llmopt.exporters.base import Exporter, ExportResult, copy_tokenizer_files
from llmopt.recipe import Recipe
from llmopt.registry import exporter_class, runner_class
from llmopt.runners.base import Runner, SamplingConfig, Speculation


@dataclass
class ExportReport:
    output: Path
    manifest: Manifest
    seconds: float
    size_bytes: int
    plan: dict[str, Any] = field(default_factory=dict)
    cached: bool = False  # copied from the compile cache instead of built

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "target": self.manifest.target,
            "cached": self.cached,
            "cache_key": self.manifest.cache_key,
            "seconds": round(self.seconds, 3),
            "size_bytes": self.size_bytes,
            "shapes": self.manifest.shapes,
            "precision": self.manifest.precision,
            "quantization": self.manifest.quantization,
            "validation": self.manifest.validation,
        }


def make_exporter(recipe: Recipe) -> Exporter:
    """The target's exporter, the recipe checked by it and by the quantization pass that follows it."""
    exporter = exporter_class(recipe.target)()
    exporter.check(recipe)
    quantization.check(recipe)
    return exporter


def plan(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe and the exact backend arguments (the fp export, then any quantization pass),
    without importing any backend."""
    exporter = make_exporter(recipe)
    steps = quantization.plan(recipe, exporter.plan(quantization.exporter_recipe(recipe)))
    return {"target": recipe.target, "recipe": recipe.to_dict(), "plan": steps}


def provenance(recipe: Recipe, checkpoint: Path, adapter: Adapter | None = None) -> dict:
    """The manifest fields that say what this export was asked for and where its weights came from."""
    source = {"model": recipe.model.id, "revision": recipe.model.revision, "checkpoint": str(checkpoint)}
    if adapter is not None:
        source["adapter"] = {"id": recipe.model.adapter, "path": str(adapter.path), "files": adapter.hashes}
    return {"recipe": recipe.to_dict(), "source": source}


@dataclass
class Adapter:
    """A LoRA adapter checked against its base: where it is, and the sha256 of its files."""

    path: Path
    hashes: dict[str, str]


def check_adapter(recipe: Recipe, checkpoint: Path) -> Adapter | None:
    """The recipe's adapter, refused in one line if it does not fit ``checkpoint``; None without one."""
    if recipe.model.adapter is None:
        return None
    path = adapters.resolve(recipe.model.adapter)
    adapters.check(path, checkpoint)
    return Adapter(path, adapters.hashes(path))


def merged_checkpoint(recipe: Recipe, checkpoint: Path, adapter: Adapter, store: cache.ArtifactCache | None) -> Path:
    base_hashes = (store or cache.ArtifactCache(cache.default_dir())).source_hashes(checkpoint)
    return adapters.merge(checkpoint, adapter.path, base_hashes, adapter.hashes, recipe.model.trust_remote_code)


def new_manifest(recipe: Recipe, exporter: Exporter, checkpoint: Path, result) -> Manifest:
    return Manifest(
        target=recipe.target,
        **provenance(recipe, checkpoint),
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
    from llmopt.runners.pytorch import reference_logits as pytorch_logits

    token_ids, reference_logits = pytorch_logits(checkpoint, min(recipe.validation.max_tokens, recipe.shapes.sequence_length))
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


@contextlib.contextmanager
def no_space_errors(output: Path) -> Iterator[None]:
    """A full disk is a one-line error; the partial artifact is already gone when this runs."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise LlmoptError(
            f"no space left on device writing {output}" + (f" ({exc.filename})" if exc.filename else ""),
            hint="free some space, or choose another -o",
        ) from exc


def export(recipe: Recipe, output: str | Path, force: bool = False, validate: bool = True,
           cache_dir: str | Path | None = None, cache_repo: str | None = None) -> ExportReport:
    """Build an artifact at ``output``; on any failure ``output`` is left as it was.

    With ``cache_dir``, an artifact built before from the same inputs is copied from there instead
    of compiled again, and a newly built one is stored there (see ``llmopt.cache``); ``cache_repo``
    (a Hub repo id) shares those entries between machines (see ``llmopt.hub_cache``).
    """
    started = time.perf_counter()
    output = Path(output)
    recipe = quantization.with_default_thresholds(recipe)  # per-format thresholds the user did not set
    exporter = make_exporter(recipe)
    artifact.check_output_free(output, force)
    sources.check_local(recipe.model.id)  # a refused architecture or vocabulary costs no backend import
    exporter.preflight(recipe)
    with events.step("resolve", f"resolving model {recipe.model.id}"):
        checkpoint = sources.resolve_model(recipe.model.id, recipe.model.revision, recipe.model.trust_remote_code)
        model_type = sources.check_architecture(checkpoint)
        adapter = check_adapter(recipe, checkpoint)
    quantization.check_model(recipe, checkpoint)
    validated = validate and recipe.validation.enabled and exporter.validates_here(recipe)
    if cache_repo is not None and cache_dir is None:
        raise UsageError("--cache-repo shares the compile cache: it cannot be used with --no-cache")
    remote = hub_cache.RemoteCache(cache_repo) if cache_repo else None
    store = cache.ArtifactCache(cache_dir, remote=remote) if cache_dir is not None else None
    key = store.key(recipe, checkpoint, exporter.backend_distributions, validated,
                    adapter=adapter.hashes if adapter else None) if store else None
    origin = provenance(recipe, checkpoint, adapter)
    with no_space_errors(output):
        if store is not None and (cached := store.restore(key, output, force, origin)) is not None:
            seconds = time.perf_counter() - started
            return ExportReport(output=output, manifest=cached, seconds=seconds, size_bytes=directory_size(output), cached=True)
        if adapter is not None:  # the merged weights are the checkpoint from here on: exporter and parity gate alike
            checkpoint = merged_checkpoint(recipe, checkpoint, adapter, store)
            origin["source"].update(base_checkpoint=origin["source"]["checkpoint"], checkpoint=str(checkpoint))
        with artifact.staging(output, force) as workdir:
            with events.step("export", f"exporting to {recipe.target}"):
                with backend_errors("export", exporter.backend_name(recipe), model_type):
                    result = exporter.export(quantization.exporter_recipe(recipe), checkpoint, workdir)
                copy_tokenizer_files(checkpoint, workdir)
                with backend_errors("quantize", quantization.library(recipe.target), model_type):
                    result.runtime = quantization.apply(recipe, workdir, result.runtime)
                memory.release()  # what the backend left in reference cycles, before the parity check loads PyTorch
            manifest = new_manifest(recipe, exporter, checkpoint, result)
            manifest.source = origin["source"]
            manifest.cache_key = key
            if validated:
                with events.step("validate", "comparing with PyTorch (teacher-forced)") as fields, \
                        backend_errors("validate", f"{_runtime_of(manifest)} or PyTorch", model_type):
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
            if store is not None:
                store.store(key, workdir)
    return ExportReport(output=output, manifest=manifest, seconds=time.perf_counter() - started, size_bytes=size)


def _runtime_of(manifest: Manifest) -> str:
    """The library that runs ``manifest``'s artifact, named when it fails."""
    return runner_class(manifest.target, manifest.static).runtime_name


def open_runner(path: str | Path, verify: bool = True, **options) -> Runner:
    """Load an artifact with the runner its manifest names; ``path`` may be the Hub id of a pushed one."""
    path = hub.artifact_path(path)
    manifest = artifact.read_manifest(path)
    return runner_class(manifest.target, manifest.static).load(path, verify=verify, **options)


def sampling_from(manifest: Manifest | None, directory: Path | None = None, penalty: bool = True,
                  **overrides: Any) -> SamplingConfig:
    """How ``run`` and ``serve`` sample: ``llmopt.generation.resolve_sampling``."""
    recipe = (manifest.recipe.get("generation") or {}) if manifest else {}
    return generation.resolve_sampling(recipe, directory, penalty, **overrides)


def run(path: str | Path, prompts: list[str], chat: bool = True, on_text=None, speculation: Speculation | None = None,
        **sampling_overrides: Any):
    """Load an artifact and generate for each prompt; returns a list of GenerationResult.

    ``speculation``: prompt-lookup or draft-model decoding, where the artifact's runner supports it."""
    path = hub.artifact_path(path)
    model_type = artifact.model_type_of(path)
    manifest = artifact.read_manifest(path)
    runtime = _runtime_of(manifest)
    with events.step("load", f"loading {path}"), backend_errors("load", runtime, model_type):
        runner = open_runner(path)
    try:
        if speculation is not None:
            runner.set_speculation(speculation)
        sampling = sampling_from(runner.manifest, runner.path, runner.repetition_penalty, **sampling_overrides)
        with backend_errors("generate", runtime, model_type):
            results = generation.generate(runner, prompts, sampling, chat=chat, on_text=on_text)
        for result in results:
            result.sampling = generation.describe(sampling)
        return results
    finally:
        runner.close()


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, replicas: int | None = None,
          ray_address: str | None = None, drain_timeout_s: float = 30.0, on_ready=None, **options: Any) -> None:
    """Serve an artifact over OpenAI's HTTP API until SIGTERM: uvicorn here, or ``replicas`` Ray Serve replicas.

    ``options``: the fields of ``llmopt.serve.app.ServeOptions`` (model_name, capacity, batch_window_ms, continuous)."""
    from llmopt.serve import server
    from llmopt.serve.app import ServeOptions

    server.serve(path, host, port, ServeOptions(**options), open_runner, sampling_from, replicas=replicas,
                 ray_address=ray_address, drain_timeout_s=drain_timeout_s, on_ready=on_ready)


def bench(config, on_event=None):
    """Artifacts and PyTorch baselines side by side, each in a fresh process: a ``llmopt.benchmark.BenchResult``
    (``config`` is a ``llmopt.benchmark.BenchConfig``)."""
    from llmopt import benchmark

    return benchmark.run(config, on_event=on_event)


# -- quantize ---------------------------------------------------------------------------------

# Recipe fields an artifact source fixes: quantizing it keeps its model, target, shapes and precision.
_ARTIFACT_FIXED = ("model", "target", "shapes", "precision")


@dataclass
class QuantizeSource:
    """What ``llmopt quantize`` starts from: a model (then ``manifest`` is None) or an fp artifact."""

    recipe: Recipe
    artifact: Path | None = None
    manifest: Manifest | None = None


def quantize_source(source: str | Path | None = None, recipe: Recipe | None = None, config: str | Path | None = None,
                    overrides: dict[str, Any] | None = None) -> QuantizeSource:
    """Decide what ``source`` is and resolve the recipe: an fp artifact (its stored recipe, then
    ``overrides``), else a model (``recipe``, or ``config`` then ``overrides`` with ``source`` as model.id).

    Validation thresholds the recipe leaves unset get the weight format's defaults
    (``llmopt.quantize.DEFAULT_THRESHOLDS``): here for an artifact, in ``export`` for a model."""
    overrides = dict(overrides or {})
    if source is not None and (Path(source) / artifact.MANIFEST_NAME).is_file():
        return _artifact_source(Path(source), config, overrides)
    if source is not None and overrides.get("model.id") is not None:
        raise UsageError(f"'{source}' is not an llmopt artifact (no {artifact.MANIFEST_NAME}), and -m was given too")
    if recipe is None:
        recipe = recipe_module.resolve(config, {**overrides, "model.id": overrides.get("model.id") or source})
    if not recipe.quantization.enabled:
        raise UsageError("nothing to quantize: quantization.weight_format is none",
                         hint="pass --weight-format int8 or int4, or set quantization.weight_format in the recipe")
    return QuantizeSource(recipe)  # export gives it the weight format's thresholds


def _artifact_source(source: Path, config: str | Path | None, overrides: dict[str, Any]) -> QuantizeSource:
    """The recipe stored in the fp artifact ``source`` with ``overrides`` applied."""
    fixed = sorted(key for key, value in overrides.items() if value is not None and key.split(".")[0] in _ARTIFACT_FIXED)
    if config is not None:
        fixed.insert(0, f"recipe file {config}")
    if fixed:
        raise UsageError(f"{', '.join(fixed)}: an artifact source keeps its model, target and shapes (and precision)",
                         hint="quantize the checkpoint with -m to choose them")
    source_manifest = artifact.load(source, verify=True)
    # The stored recipe has every field written out: keep what the artifact fixes and its runtime
    # sections, but not its fp validation thresholds nor its (empty) quantization section, so the
    # weight format's defaults apply to what the overrides leave unset.
    base = {key: value for key, value in source_manifest.recipe.items() if key != "quantization"}
    base["validation"] = {key: value for key, value in (base.get("validation") or {}).items()
                          if key not in ("min_top1_agreement", "max_mean_kl")}
    recipe = recipe_module.resolve(None, overrides, base=base)
    if not recipe.quantization.enabled:
        raise UsageError("nothing to quantize: quantization.weight_format is none", hint="pass --weight-format int8 or int4")
    quantization.check_source(source_manifest, recipe)
    return QuantizeSource(quantization.with_default_thresholds(recipe), source, source_manifest)


def quantize_plan(source: str | Path | None = None, recipe: Recipe | None = None, config: str | Path | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``plan`` of what ``quantize`` would build from the same arguments; names the source artifact."""
    start = quantize_source(source, recipe, config, overrides)
    planned = plan(start.recipe)
    return {"source_artifact": str(start.artifact), **planned} if start.artifact is not None else planned


def quantize(output: str | Path, recipe: Recipe | None = None, source: str | Path | None = None,
             overrides: dict[str, Any] | None = None, force: bool = False, validate: bool = True,
             cache_dir: str | Path | None = None, config: str | Path | None = None, cache_repo: str | None = None) -> ExportReport:
    """Quantize into ``output``: an fp artifact ``source`` (keeping its shapes), else ``recipe``'s model
    (or ``source`` as the model, with ``config`` and ``overrides``).

    From an artifact, ``overrides`` (dotted recipe paths) apply to the recipe stored in it, the pass
    runs on a copy of it, and the artifact's own logits are the reference; from a model this is
    ``export`` with the quantization section set, validated against PyTorch.
    """
    start = quantize_source(source, recipe, config, overrides)
    if start.artifact is None:
        return export(start.recipe, output, force=force, validate=validate, cache_dir=cache_dir, cache_repo=cache_repo)
    return _quantize_artifact(start, Path(output), force, validate)


def _quantize_artifact(start: QuantizeSource, output: Path, force: bool, validate: bool) -> ExportReport:
    started = time.perf_counter()
    recipe, source, source_manifest = start.recipe, start.artifact, start.manifest
    exporter = make_exporter(recipe)
    artifact.check_output_free(output, force)
    exporter.preflight(recipe)
    quantization.check_model(recipe, source)
    model_type = artifact.model_type_of(source)
    with no_space_errors(output), artifact.staging(output, force) as workdir:
        with events.step("quantize", f"quantizing {source} ({recipe.quantization.weight_format})"):
            artifact.copy_body(source, workdir)
            with backend_errors("quantize", quantization.library(recipe.target), model_type):
                runtime = quantization.apply(recipe, workdir, source_manifest.runtime)
        result = ExportResult(io=source_manifest.io, runtime=runtime)
        manifest = new_manifest(recipe, exporter, Path(source_manifest.source.get("checkpoint") or source), result)
        manifest.source["artifact"] = str(source)
        if validate and recipe.validation.enabled and exporter.validates_here(recipe):
            with events.step("validate", "comparing with the fp artifact (teacher-forced)") as fields, \
                    backend_errors("validate", _runtime_of(manifest), model_type):
                manifest.validation = validate_against_artifact(recipe, source, source_manifest, workdir, manifest)
                fields.update(manifest.validation)
            if not manifest.validation["passed"]:
                raise ValidationFailed(validation_failure(manifest.validation), hint="loosen validation.* in the recipe, or pass --no-validate")
        with events.step("write", f"writing {output}"):
            artifact.finalize(workdir, manifest)
            size = directory_size(workdir)
    return ExportReport(output=output, manifest=manifest, seconds=time.perf_counter() - started, size_bytes=size)


def validate_against_artifact(recipe: Recipe, source: Path, source_manifest: Manifest, workdir: Path,
                              manifest: Manifest) -> dict[str, Any]:
    """Teacher-forced comparison of the artifact in ``workdir`` with the fp artifact ``source``."""
    reference = runner_class(source_manifest.target, source_manifest.static).load(source, verify=False)
    try:
        limit = min(recipe.validation.max_tokens, manifest.sequence_length)
        token_ids = validation.validation_ids(reference.tokenizer, limit)
        reference_logits = reference.logits(token_ids)
    finally:
        reference.close()
    candidate = runner_class(manifest.target, manifest.static)(workdir, manifest.batch_size, manifest.sequence_length, manifest=manifest)
    try:
        metrics = validation.compare(reference_logits, candidate.logits(token_ids), token_ids)
    finally:
        candidate.close()
    thresholds = recipe.validation
    metrics["reference"] = f"artifact {source}"
    metrics["passed"] = bool(
        metrics["top1_agreement"] >= thresholds.min_top1_agreement and metrics["mean_kl"] <= thresholds.max_mean_kl
    )
    metrics["thresholds"] = {"min_top1_agreement": thresholds.min_top1_agreement, "max_mean_kl": thresholds.max_mean_kl}
    return metrics


def validation_failure(metrics: dict[str, Any]) -> str:
    thresholds = metrics["thresholds"]
    return (f"validation failed: top-1 agreement {metrics['top1_agreement']:.3f} (min {thresholds['min_top1_agreement']}), "
            f"mean KL {metrics['mean_kl']:.4f} (max {thresholds['max_mean_kl']}); no artifact written")
