"""The exporter contract every target implements.

``check`` and ``plan`` are pure (no backend import, no disk), so ``--dry-run`` and CI can test
every shipped recipe on any machine. ``preflight`` imports the backend and looks for the
hardware, failing before any work. ``export`` writes the artifact body into a work directory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llmopt.recipe import Recipe


@dataclass
class ExportResult:
    io: dict[str, Any] = field(default_factory=dict)  # input/output names and shapes
    runtime: dict[str, Any] = field(default_factory=dict)  # how the artifact is loaded (loader, files, options)
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific manifest fields


class Exporter(ABC):
    target: ClassVar[str]
    extra: ClassVar[str]  # the pip extra that installs this target
    backend_distributions: ClassVar[tuple[str, ...]] = ()
    backend: ClassVar[str] = ""  # what builds the artifact, named when it fails

    def backend_name(self, recipe: Recipe) -> str:
        """The library that builds this recipe's artifact (named in a one-line backend failure)."""
        return f"torch.onnx static export ({self.target})" if recipe.shapes.static else self.backend

    def validates_here(self, recipe: Recipe) -> bool:
        """Whether the export host can run the artifact's teacher-forced parity check against PyTorch."""
        return True

    def check(self, recipe: Recipe) -> None:
        """Raise RecipeError for a value this target cannot honour. Pure: no imports, no disk."""

    @abstractmethod
    def plan(self, recipe: Recipe) -> dict[str, Any]:
        """The exact backend calls and arguments an export would make, as JSON-able data. Pure."""

    @abstractmethod
    def preflight(self, recipe: Recipe) -> None:
        """Import the backend and check the hardware; raise MissingDependencyError before any work."""

    @abstractmethod
    def export(self, recipe: Recipe, checkpoint: Path, workdir: Path) -> ExportResult:
        """Build the artifact body into ``workdir`` (tokenizer files included)."""


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def copy_tokenizer_files(checkpoint: Path, workdir: Path) -> None:
    """The tokenizer, chat template and generation config travel with every artifact."""
    import shutil

    for name in TOKENIZER_FILES:
        source = checkpoint / name
        if source.is_file() and not (workdir / name).exists():
            shutil.copy2(source, workdir / name)
