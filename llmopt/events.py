"""Progress events: one logger, steps with timings.

Library code calls ``step("export")`` and ``info("...")``; the CLI decides how they look
(rich lines on a terminal, plain lines otherwise, or one JSON object per event).

Test hook: ``LLMOPT_FAULT_SLEEP_AT=<step>`` (or ``<step>:end``) makes the process log a warning and
sleep at the start (or the end) of that step, so tests/test_fault.py can kill -9 it there; it exits
without cleanup once its parent is gone or after ten minutes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from typing import Any, Iterator

logger = logging.getLogger("llmopt")


def info(message: str, **fields: Any) -> None:
    logger.info(message, extra={"event": "info", "fields": fields})


def warning(message: str, **fields: Any) -> None:
    logger.warning(message, extra={"event": "warning", "fields": fields})


@contextlib.contextmanager
def backend_output_hidden() -> Iterator[None]:
    """A backend's prints stay off stdout, which holds results only: on stderr with LLMOPT_DEBUG, otherwise
    dropped (a failure is one line, ``llmopt.errors.backend_errors``; LLMOPT_DEBUG=1 shows all of it)."""
    if os.environ.get("LLMOPT_DEBUG"):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    # Their loggers hold the real stderr, so a redirect does not reach them.
    loggers = [logging.getLogger(name) for name in ("transformers", "optimum", "nncf", "accelerate")]
    levels = [each.level for each in loggers]
    try:
        for each in loggers:
            each.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def _fault_point(name: str, when: str) -> None:
    wanted = os.environ.get("LLMOPT_FAULT_SLEEP_AT")
    if wanted and wanted in (f"{name}:{when}", name if when == "start" else None):
        warning(f"fault hook: sleeping at {name}:{when}", fault=f"{name}:{when}", pid=os.getpid())
        parent, deadline = os.getppid(), time.monotonic() + 600
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(137)  # the test meant to kill us here: never go on, and exit like a kill if it could not


@contextlib.contextmanager
def step(name: str, message: str | None = None, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log the start and the end (with seconds) of a named step; the yielded dict adds fields."""
    logger.info(message or f"{name}...", extra={"event": "start", "step": name, "fields": fields})
    _fault_point(name, "start")
    started = time.perf_counter()
    result: dict[str, Any] = {}
    try:
        yield result
    except BaseException:
        elapsed = time.perf_counter() - started
        logger.info(f"{name} failed after {elapsed:.1f}s", extra={"event": "fail", "step": name, "seconds": elapsed, "fields": result})
        raise
    elapsed = time.perf_counter() - started
    logger.info(f"{name} done in {elapsed:.1f}s", extra={"event": "end", "step": name, "seconds": elapsed, "fields": result})
    _fault_point(name, "end")
