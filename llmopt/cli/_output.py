"""How the CLI shows things: results to stdout, progress and errors to stderr.

Log formats: ``rich`` (a terminal), ``plain`` (one line per event, the default when stderr is not a
terminal) and ``json`` (one object per event, for CI).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from llmopt.events import logger

LOG_FORMATS = ("auto", "rich", "plain", "json")


class JsonEventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": round(time.time(), 3),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "info"),
            "message": record.getMessage(),
        }
        for key in ("step", "seconds"):
            if hasattr(record, key):
                event[key] = round(getattr(record, key), 3) if key == "seconds" else getattr(record, key)
        fields = getattr(record, "fields", None)
        if fields:
            event["fields"] = fields
        return json.dumps(event, default=str)


def configure_logging(log_format: str = "auto", quiet: bool = False, verbose: bool = False) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if log_format == "auto":
        log_format = "rich" if sys.stderr.isatty() else "plain"
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonEventFormatter())
    elif log_format == "rich":
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("llmopt: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def one_line(text: str) -> str:
    """User text echoed in an error (a recipe key, a target name) must not break the line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def print_error(message: str, hint: str | None = None) -> None:
    sys.stderr.write(f"error: {one_line(message)}\n")
    if hint:
        sys.stderr.write(f"hint: {one_line(hint)}\n")
    sys.stderr.flush()
