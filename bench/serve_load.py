#!/usr/bin/env python3
"""Serving under load: requests/s, TTFT p50/p99 and total tokens/s at 1, 4 and 16 concurrent clients.

For each artifact, ``llmopt serve`` is started on 127.0.0.1 (and, with --replicas, once more as N Ray
Serve replicas), loaded by streaming clients (``llmopt.serve.load``), then stopped with SIGTERM. One
run, one table (stdout, and bench/results/serve_load.md / .jsonl). Or point it at a running server:

    python bench/serve_load.py out/smol-onnx-int4 out/smol-ov-int4 --replicas 2
    python bench/serve_load.py --url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from llmopt.serve.load import run_load, served_model, table  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start(artifact: str, flags: list[str], log: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-c", "from llmopt.cli.main import entry; entry()", "serve", artifact, "--host", HOST,
               "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"llmopt serve {artifact} exited ({process.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as response:
                if response.status == 200 and "llmopt: http://" in log.read_text():
                    return process, f"http://{HOST}:{port}/v1"
        except OSError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"llmopt serve {artifact} did not start in {timeout}s; see {log}")


def measure(url: str, label: str, clients: list[int], args) -> list[dict]:
    model = served_model(url)
    run_load(url, model, 1, requests_per_client=1, max_tokens=8)  # warm-up, not counted
    rows = []
    for count in clients:
        row = {"server": label, **run_load(url, model, count, args.requests_per_client, args.max_tokens,
                                                  **({"prompt": args.prompt} if args.prompt else {})).row()}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="*", help="artifact directories to serve one after another")
    parser.add_argument("--url", help="measure this running server instead (its /v1 URL)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--replicas", type=int, default=0, help="also serve each artifact as N Ray Serve replicas")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default=None, help="the chat prompt (default: llmopt.serve.load.PROMPT)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    clients = [int(item) for item in args.clients.split(",")]
    if not args.artifacts and not args.url:
        parser.error("give artifact directories or --url")
    rows = []
    if args.url:
        rows += measure(args.url, args.url, clients, args)
    args.out.mkdir(parents=True, exist_ok=True)
    for artifact in args.artifacts:
        setups = [(Path(artifact).name, [])]
        if args.replicas:
            setups.append((f"{Path(artifact).name} x{args.replicas} Ray replicas", ["--replicas", str(args.replicas)]))
        for label, flags in setups:
            process, url = start(artifact, flags, args.out / f"serve-{Path(artifact).name}{'-ray' if flags else ''}.log")
            try:
                rows += measure(url, label, clients, args)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(120)
    text = table(rows)
    print(text)
    (args.out / "serve_load.md").write_text(text + "\n")
    (args.out / "serve_load.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
