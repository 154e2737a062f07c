"""``llmopt serve``: an OpenAI-compatible HTTP server for an artifact (or N Ray Serve replicas of it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from llmopt import api
from llmopt.cli.main import app


@app.command()
def serve(
    artifact: Path = typer.Argument(..., help="Artifact directory made by llmopt export or quantize."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model name clients send "
                                             "(default: the artifact directory's name)."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests queued or running per server or replica; "
                                  "more are answered 429 with Retry-After."),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", min=0.0, help="Pinned-batch artifacts: how long "
                                          "a request waits for others to share its batch."),
    continuous: bool = typer.Option(True, "--continuous/--no-continuous", help="OpenVINO artifacts: openvino-genai's "
                                    "continuous batching (else the artifact's pinned batches)."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0.0, help="On SIGTERM: seconds the requests in "
                                        "flight may take to finish."),
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="Deploy N replicas on Ray Serve "
                                           "(pip install 'llmopt[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --replicas: an existing Ray cluster "
                                              "(default: start a local Ray instance)."),
) -> None:
    """Serve an artifact over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models), with /health
    and Prometheus /metrics, until SIGTERM."""

    def ready(line: str) -> None:
        sys.stderr.write(f"llmopt: {line}\n")
        sys.stderr.flush()

    api.serve(artifact, host=host, port=port, replicas=replicas, ray_address=ray_address, drain_timeout_s=drain_timeout,
              on_ready=ready, model_name=model_name, capacity=max_queue, batch_window_ms=batch_window_ms,
              continuous=continuous)
