"""The errors llmopt raises on purpose, and the exit codes they map to.

Anything raised as an ``LlmoptError`` is shown to the user as one line (plus an optional hint);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator

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


class BackendError(LlmoptError):
    """An exception raised inside a backend (builder, optimum-intel, NNCF, a runtime), in one line."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, shortened; its type name if it has none."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    if line.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for Linear:" says why below
        line = f"{line} {lines[1]}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def backend_errors(step: str, backend: str, model_type: str | None = None) -> Iterator[None]:
    """Any exception a backend raises during ``step`` becomes one BackendError line (exit 1) naming the
    step, the backend, the model_type and the backend's own message; the original is chained, so
    ``LLMOPT_DEBUG=1`` shows its traceback. llmopt's own errors and a full disk pass through."""
    try:
        yield
    except LlmoptError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise _backend_error(step, backend, model_type, exc) from exc
    except Exception as exc:
        raise _backend_error(step, backend, model_type, exc) from exc


def _backend_error(step: str, backend: str, model_type: str | None, exc: Exception) -> BackendError:
    of_model = f" for model_type '{model_type}'" if model_type else ""
    message = f"{step} failed in {backend}{of_model}: {type(exc).__name__}: {first_line(exc)}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and first_line(cause) not in message:  # a wrapper's generic line hides the reason
        message += f" (from {type(cause).__name__}: {first_line(cause)})"
    return BackendError(message, hint="LLMOPT_DEBUG=1 shows the traceback and the backend's output")
