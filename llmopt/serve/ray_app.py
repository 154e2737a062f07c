"""The same application as a Ray Serve deployment: N replicas of the artifact behind Ray Serve's router.

Each replica builds the FastAPI application of ``llmopt.serve.app`` and opens its own copy of the
artifact. Without ``ray_address`` a local Ray instance is started whose node address is the loopback
address when the server listens on it (Ray otherwise picks the machine's network address), with no
dashboard; with it, the deployment joins that cluster.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

from llmopt._deps import require
from llmopt.errors import LlmoptError
from llmopt.serve.app import ServeOptions, build_app

APP_NAME = "llmopt"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # the replicas pass no objects: keep Ray's shared memory small


class LlmoptReplica:
    """One Ray Serve replica: ``llmopt.serve.app`` over its own copy of the artifact."""

    def __init__(self, artifact: str, options: ServeOptions, open_runner: Callable, sampling_from: Callable):
        self._arguments = (artifact, options, open_runner, sampling_from)

    def __serve_build_asgi_app__(self):
        return build_app(*self._arguments)


def start_ray(host: str, ray_address: Optional[str]):
    """Join ``ray_address``, or start a local instance: loopback-only when the server listens on loopback."""
    if ray_address is not None:
        ray = require("ray", extra="ray")
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        return ray
    local = host in LOOPBACK
    if local:
        # Ray resolves a node address of 127.0.0.1 to the machine's network address (and its agents listen
        # there) unless this, read when ray is imported, says a single-machine instance is wanted.
        os.environ[SINGLE_MACHINE_ENV] = "0"
    ray = require("ray", extra="ray")
    ray.init(_node_ip_address="127.0.0.1" if local else None, include_dashboard=False, log_to_driver=False,
             object_store_memory=OBJECT_STORE_BYTES)
    return ray


def deploy(artifact: Path, host: str, port: int, options: ServeOptions, open_runner: Callable, sampling_from: Callable,
           replicas: int, ray_address: Optional[str] = None, replica_cpus: float = 1.0):
    """Start (or join) Ray, and run the deployment; returns once every replica answers."""
    start_ray(host, ray_address)
    serve_module = require("ray.serve", extra="ray", package="ray[serve]")
    serve_module.start(http_options={"host": host, "port": port})
    wrapped = serve_module.ingress()(LlmoptReplica)
    deployment = serve_module.deployment(
        name=APP_NAME, num_replicas=replicas, max_ongoing_requests=options.capacity,
        ray_actor_options={"num_cpus": replica_cpus},
    )(wrapped)
    try:
        serve_module.run(deployment.bind(str(artifact), options, open_runner, sampling_from), name=APP_NAME,
                         route_prefix="/")
    except Exception as exc:  # a replica that cannot open the artifact: Ray's deployment error, in one line
        shutdown()
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise LlmoptError(f"the Ray Serve deployment failed: {reason}", hint="see the Ray logs under /tmp/ray") from exc


def shutdown() -> None:
    ray = require("ray", extra="ray")
    serve_module = require("ray.serve", extra="ray", package="ray[serve]")
    try:
        serve_module.shutdown()  # replicas finish their requests (Ray Serve's graceful shutdown) before they stop
    finally:
        ray.shutdown()


def serve(artifact: Path, host: str, port: int, options: ServeOptions, open_runner: Callable, sampling_from: Callable,
          replicas: int, ray_address: Optional[str] = None, on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Deploy and block until SIGTERM or Ctrl-C, then drain and shut Ray Serve down."""
    deploy(artifact, host, port, options, open_runner, sampling_from, replicas, ray_address)
    stop = threading.Event()
    # After ray.init, whose own handler would end the driver at once without draining the replicas.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_ready is not None:
            on_ready(f"http://{host}:{port}/v1 serving {options.model_name or artifact.resolve().name} "
                     f"on {replicas} Ray Serve replicas")
        stop.wait()
        shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
