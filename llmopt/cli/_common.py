"""Options shared by the commands that build artifacts (export, quantize)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from llmopt import recipe as recipe_module
from llmopt.recipe import Recipe
from llmopt.registry import TARGETS

# Each flag is a recipe field; both spellings (--batch-size, --batch_size) are accepted.
ConfigOption = typer.Option(None, "--config", "-c", help="Recipe YAML; flags override its fields.")
SetOption = typer.Option([], "--set", help="Override any recipe field: --set quantization.group_size=64 (repeatable).")
ModelOption = typer.Option(None, "--model", "-m", help="Hub id, local checkpoint directory, or .gguf file.")
TargetOption = typer.Option(None, "--target", "-t", help=f"One of: {', '.join(TARGETS)}.")
BatchSizeOption = typer.Option(None, "--batch-size", "--batch_size", help="Pinned batch size.")
SequenceLengthOption = typer.Option(None, "--sequence-length", "--sequence_length", help="Pinned prompt + generated tokens.")
DtypeOption = typer.Option(None, "--dtype", help="fp32, fp16 or bf16.")
AdapterOption = typer.Option(None, "--adapter", help="PEFT LoRA adapter (directory or Hub id) merged into the weights first.")
CacheRepoOption = typer.Option(None, "--cache-repo", envvar="LLMOPT_CACHE_REPO",
                               help="Hub repo shared as a compile cache (CI matrices): fetched on a miss, filled after a build.")
StaticOption = typer.Option(None, "--static/--dynamic", help="Fully static graphs (padded prefill + one-token decode).")


def resolve_recipe(config: Optional[Path], set_items: list[str], **flags: Any) -> Recipe:
    """Recipe file, then named flags (those of ``flag_overrides``), then ``--set`` items (the most specific wins)."""
    overrides = flag_overrides(**flags)
    overrides.update(recipe_module.parse_set_options(set_items))
    return recipe_module.resolve(config, overrides)


def flag_overrides(
    model: Optional[str] = None,
    target: Optional[str] = None,
    batch_size: Optional[int] = None,
    sequence_length: Optional[int] = None,
    dtype: Optional[str] = None,
    static: Optional[bool] = None,
    adapter: Optional[str] = None,
) -> dict[str, Any]:
    """The named flags as dotted recipe paths (None: not given, ignored by ``recipe.resolve``)."""
    return {
        "model.id": model,
        "target": target,
        "shapes.batch_size": batch_size,
        "shapes.sequence_length": sequence_length,
        "precision.dtype": dtype,
        "shapes.static": static,
        "model.adapter": adapter,
    }
