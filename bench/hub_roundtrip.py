#!/usr/bin/env python3
"""Time ``llmopt push`` and ``llmopt pull`` of an artifact against the local Hub test server.

Starts ``tests/hub_server.py`` on 127.0.0.1 (a free port), then runs the real CLI in fresh processes
with HF_ENDPOINT pointing at it, ``--repeat`` times each, and prints the best and median wall time
of each with the artifact's size (a pull includes the sha256 check of every file and the backend
version check, as every pull does):

    llmopt quantize -m models/SmolLM2-135M-Instruct --target onnx --weight-format int4 -o out/smol-onnx-int4
    python bench/hub_roundtrip.py out/smol-onnx-int4 --repeat 3 --json

Each push goes to a fresh repo (a second push of the same files would upload nothing) and each
pull to a fresh directory with an empty huggingface_hub cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hub_server import HubServer  # noqa: E402

TOKEN = "hf_bench_token"


def llmopt(args: list[str], env: dict) -> float:
    code = "import sys; from llmopt.cli.main import main; sys.exit(main(sys.argv[1:]))"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, "--quiet", *args], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"llmopt {' '.join(args)} failed:\n{result.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    options = parser.parse_args()
    size = sum(file.stat().st_size for file in options.artifact.rglob("*") if file.is_file())
    times: dict[str, list[float]] = {"push": [], "pull": []}
    with HubServer(token=TOKEN) as server, tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        for run in range(options.repeat):
            repo = f"bench/artifact-{run}"
            times["push"].append(llmopt(["push", str(options.artifact), repo], env))
            pull_env = {**env, "HF_HOME": f"{scratch}/hf-{run}"}
            times["pull"].append(llmopt(["pull", repo, "-o", f"{scratch}/pulled-{run}"], pull_env))
    result = {"artifact": str(options.artifact), "size_mb": round(size / 1e6, 1), "repeat": options.repeat,
              **{f"{verb}_s": {"best": round(min(values), 2), "median": round(statistics.median(values), 2)}
                 for verb, values in times.items()}}
    if options.json:
        print(json.dumps(result))
    else:
        print(f"{result['artifact']} ({result['size_mb']} MB): push best {result['push_s']['best']} s, "
              f"median {result['push_s']['median']} s; pull best {result['pull_s']['best']} s, "
              f"median {result['pull_s']['median']} s  (includes CLI start-up; local server on 127.0.0.1)")


if __name__ == "__main__":
    main()
