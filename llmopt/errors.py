"""The errors llmopt raises on purpose, and the exit codes they map to.

Anything raised as an ``LlmoptError`` is shown to the user as one line (plus an optional hint);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class LlmoptError(Exception):
    """A failure the user can act on: one line of message, an optional one-line hint."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(LlmoptError):
    """Bad flags or arguments: exit 2."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """A recipe field that is unknown, mistyped, or that the chosen target cannot honour: exit 2."""


class MissingDependencyError(LlmoptError):
    """A target's library is not installed: exit 1 with the pip command."""


class ArtifactError(LlmoptError):
    """An artifact that is missing, corrupt, or built by versions this machine cannot load."""


class PromptTooLongError(UsageError):
    """A prompt that does not fit the artifact's pinned sequence length."""


class ValidationFailed(LlmoptError):
    """An artifact that misses the recipe's validation thresholds against PyTorch."""
