"""Weight quantization as a pass over an fp artifact body: the part every target shares.

The exporters build fp artifacts only. For a target listed in ``BACKENDS``, ``llmopt.api`` runs
the exporter on ``fp_recipe(recipe)``, then ``apply(recipe, body, runtime)`` on the staged body;
re-quantizing an existing fp artifact is the same pass on a copy of it. Each backend module
(``llmopt.quantize.openvino``, ``llmopt.quantize.onnx``) has:

* ``check(recipe)``: pure; RecipeError for a combination the backend cannot build.
* ``group_sizes(recipe, config)``: RecipeError, before any work, for groups the layers cannot take.
* ``plan(recipe, runtime) -> dict``: pure; the pass's step and the runtime options it leaves.
* ``quantize(recipe, body, runtime) -> runtime``: rewrites the weights in the directory ``body``.

Targets that quantize while they build (tensorrt: ModelOpt checkpoints) keep it in their exporter.
Nothing here imports a backend.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from llmopt.errors import RecipeError
from llmopt.recipe import Recipe

BACKENDS: dict[str, str] = {
    "openvino": "llmopt.quantize.openvino",
    "onnx": "llmopt.quantize.onnx",
}

# What does the work, named when it fails.
LIBRARIES: dict[str, str] = {"openvino": "openvino/nncf", "onnx": "onnx/onnxruntime quantization"}


def library(target: str) -> str:
    """The library the quantization pass of ``target`` runs on (named in a one-line backend failure)."""
    return LIBRARIES.get(target, target)

# Validation thresholds when the recipe sets none of its own (fp keeps Validation's defaults).
# From SmolLM2-135M on openvino (teacher-forced, 192 tokens of llmopt/data/validation.txt): int8
# 0.92 / KL 0.004; int4 HQQ 0.97 / 0.001, NNCF AWQ 0.73 / 0.21 pass; NNCF int4 round-to-nearest,
# the degenerate one (0.66 / 0.33), fails.
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "int8": {"min_top1_agreement": 0.85, "max_mean_kl": 0.05},
    "int4": {"min_top1_agreement": 0.70, "max_mean_kl": 0.30},
    "fp8": {"min_top1_agreement": 0.85, "max_mean_kl": 0.05},
}
# Group sizes tried, largest first, when the recipe leaves quantization.group_size unset.
GROUP_SIZES = (128, 64, 32, 16)


def backend(target: str) -> ModuleType:
    """The quantization module of ``target``; RecipeError for a target without one."""
    if target not in BACKENDS:
        raise RecipeError(
            f"quantization is not supported for target '{target}' by llmopt quantize; "
            f"accepted targets: {', '.join(BACKENDS)}",
            hint="set quantization.weight_format: none",
        )
    return importlib.import_module(BACKENDS[target])


def applies(recipe: Recipe) -> bool:
    """Whether the recipe's quantization runs as a pass after the fp export."""
    return recipe.quantization.enabled and recipe.target in BACKENDS


def exporter_recipe(recipe: Recipe) -> Recipe:
    """What the target's exporter builds: the fp recipe when a pass quantizes after it."""
    return fp_recipe(recipe) if applies(recipe) else recipe


def check(recipe: Recipe) -> None:
    """The pass's own check of the quantization section. Pure."""
    if applies(recipe):
        backend(recipe.target).check(recipe)


def check_model(recipe: Recipe, directory: Path) -> None:
    """RecipeError, before any work, for group sizes the layers of the model in ``directory`` cannot take."""
    if applies(recipe):
        backend(recipe.target).group_sizes(recipe, read_config(directory))


def plan(recipe: Recipe, fp_plan: dict[str, Any]) -> dict[str, Any]:
    """The fp export's steps, the pass, then the runtime options the pass leaves. Pure."""
    if not applies(recipe):
        return fp_plan
    steps = {key: value for key, value in fp_plan.items() if key != "runtime"}
    return {**steps, **backend(recipe.target).plan(recipe, fp_plan["runtime"])}


def apply(recipe: Recipe, body: Path, runtime: dict[str, Any]) -> dict[str, Any]:
    """Quantize the weights of the fp artifact body in ``body`` in place; the artifact's runtime options."""
    if not applies(recipe):
        return runtime
    return backend(recipe.target).quantize(recipe, Path(body), runtime)


def check_format_and_shapes(recipe: Recipe, formats: tuple[str, ...], why: str) -> None:
    """The checks every target's quantization makes first: a weight format it has (``why`` says where
    the others are missing), and dynamic shapes. Pure."""
    q = recipe.quantization
    if q.weight_format not in formats:
        raise RecipeError(
            f"quantization.weight_format '{q.weight_format}' is not supported by the {recipe.target} target{why}; "
            f"accepted: {', '.join(formats)}",
            hint="fp8 weights need a GPU target (tensorrt)" if q.weight_format == "fp8" else None,
        )
    if recipe.shapes.static:
        raise RecipeError(f"quantization with shapes.static is not supported by the {recipe.target} target yet",
                          hint="set shapes.static: false, or quantization.weight_format: none")


def with_default_thresholds(recipe: Recipe) -> Recipe:
    """The recipe with per-format validation thresholds for those the user did not set."""
    defaults = DEFAULT_THRESHOLDS.get(recipe.quantization.weight_format)
    if not defaults:
        return recipe
    explicit = recipe.validation.model_fields_set
    update = {name: value for name, value in defaults.items() if name not in explicit}
    if not update:
        return recipe
    validation = recipe.validation.model_copy(update=update)
    validation.__pydantic_fields_set__ = set(explicit)  # defaults stay defaults for the next caller
    return recipe.model_copy(update={"validation": validation})


# -- model dimensions and group sizes ---------------------------------------------------------


def matmul_input_sizes(config: dict[str, Any]) -> dict[str, int]:
    """Input-channel sizes of the decoder's linear layers, from a transformers config.json."""
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else hidden))
    sizes = {"hidden_size": hidden, "attention output (heads x head_dim)": heads * head_dim if heads else hidden}
    if config.get("intermediate_size"):
        sizes["intermediate_size"] = int(config["intermediate_size"])
    return sizes


def fp_recipe(recipe: Recipe) -> Recipe:
    """The same recipe without quantization: what the target's exporter builds before quantizing."""
    return recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"weight_format": "none"})})


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise RecipeError(f"cannot size quantization groups: {path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def dividing_group_sizes(sizes: dict[str, int], candidates: tuple[int, ...] = GROUP_SIZES) -> list[int]:
    return [size for size in candidates if all(value % size == 0 for value in sizes.values())]


def choose_group_size(requested: int | None, sizes: dict[str, int], candidates: tuple[int, ...] = GROUP_SIZES) -> int:
    """``requested`` when it divides every layer's input size; else the largest of ``candidates`` that does.

    -1 (one group per output channel) always works.
    """
    working = dividing_group_sizes(sizes, candidates)
    described = ", ".join(f"{name} {value}" for name, value in sizes.items())
    if requested is None:
        if not working:
            return -1
        return working[0]
    if requested == -1 or all(value % requested == 0 for value in sizes.values()):
        return requested
    accepted = ", ".join(str(size) for size in [*dividing_group_sizes(sizes), -1])
    raise RecipeError(
        f"quantization.group_size {requested} does not divide the model's layer sizes ({described}); "
        f"accepted: {accepted}",
        hint="or leave quantization.group_size unset to pick the largest that divides",
    )


def check_source(source_manifest, recipe: Recipe) -> None:
    """An artifact that can be quantized: fp weights, dynamic shapes, the recipe's target."""
    quantization = source_manifest.quantization or {}
    if quantization.get("weight_format", "none") != "none":
        raise RecipeError(
            f"the source artifact is already quantized (weight_format {quantization['weight_format']}); "
            "quantizing it again would compound the error",
            hint="quantize its fp artifact, or the checkpoint with -m",
        )
    if source_manifest.static:
        raise RecipeError(
            "quantizing a shapes.static artifact is not supported yet",
            hint="quantize a dynamic-shape artifact, or the checkpoint with -m",
        )
    if source_manifest.target != recipe.target:
        raise RecipeError(f"target '{recipe.target}' differs from the source artifact's '{source_manifest.target}'")
