"""Serve an artifact until SIGTERM: uvicorn on one machine, or Ray Serve replicas (``replicas``).

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets the requests in flight finish (up to
``drain_timeout_s``), then the engine finishes what it admitted and the artifact is closed.
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path
from typing import Callable, Optional

from llmopt import artifact as artifact_module
from llmopt._deps import require
from llmopt.errors import LlmoptError, UsageError
from llmopt.serve.app import ServeOptions

log = logging.getLogger("llmopt.serve")


def check_port_free(host: str, port: int) -> None:
    """A port in use is a one-line error before the artifact is loaded, not a uvicorn traceback after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LlmoptError(f"{host}:{port} is already in use", hint="choose another --port") from exc
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}", hint="check --host") from exc


def serve(artifact: str | Path, host: str, port: int, options: ServeOptions, open_runner: Callable,
          sampling_from: Callable, replicas: Optional[int] = None, ray_address: Optional[str] = None,
          drain_timeout_s: float = 30.0, on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve ``artifact`` over OpenAI's HTTP API until SIGTERM or Ctrl-C."""
    artifact = Path(artifact)
    artifact_module.read_manifest(artifact)  # a missing or foreign directory: one line, before anything starts
    if options.capacity < 1:
        raise UsageError(f"--max-queue must be at least 1, got {options.capacity}")
    if ray_address is not None and replicas is None:
        raise UsageError("--ray-address deploys Ray Serve replicas; give --replicas N as well")
    if replicas is not None:
        if replicas < 1:
            raise UsageError(f"--replicas must be at least 1, got {replicas}")
        from llmopt.serve import ray_app

        return ray_app.serve(artifact, host, port, options, open_runner, sampling_from, replicas, ray_address,
                             on_ready=on_ready)
    uvicorn = require("uvicorn", extra="serve")
    from llmopt.serve.app import Served, build_app

    check_port_free(host, port)
    served = Served(artifact, options, open_runner, sampling_from)
    app = build_app(artifact, options, open_runner, sampling_from, served=served)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout_s, log_config=None,
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(f"http://{host}:{port}/v1 serving {served.name} ({served.engine.kind}, "
                 f"batch {served.runner.batch_size}, sequence length {served.runner.sequence_length})")
    server.run()
