"""Helpers shared by the hardening tests (cache, verify, doctor, fault, fuzz, CLI errors)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from llmopt import api, artifact
from llmopt._deps import version_of
from llmopt.artifact import Manifest
from llmopt.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
_EXPORTED: dict[tuple, Path] = {}


def pytorch_artifact(checkpoint: Path, output: Path, sequence_length: int = 32) -> Path:
    """A real artifact without any exporter: the checkpoint itself, for the ``pytorch`` runner."""
    recipe = Recipe.model_validate({"model": {"id": str(checkpoint)}, "target": "onnx",
                                    "shapes": {"sequence_length": sequence_length}})
    with artifact.staging(output) as workdir:
        for path in checkpoint.iterdir():
            if path.is_file():
                shutil.copy2(path, workdir / path.name)
        manifest = Manifest(
            target="pytorch", recipe=recipe.to_dict(), source={"model": str(checkpoint)},
            backend_versions={name: version_of(name) for name in ("torch", "transformers")},
            shapes=recipe.shapes.model_dump(), precision="fp32", quantization={},
        )
        artifact.finalize(workdir, manifest)
    return output


def onnx_recipe(checkpoint: Path, sequence_length: int = 32, **extra) -> Recipe:
    data = {"model": {"id": str(checkpoint)}, "target": "onnx", "shapes": {"sequence_length": sequence_length}}
    data.update(extra)
    return Recipe.model_validate(data)


def exported_onnx(checkpoint: Path, tmp_path_factory, sequence_length: int = 32) -> Path:
    """The tiny model exported to ONNX once per session (validated, no cache)."""
    key = (str(checkpoint), sequence_length)
    if key not in _EXPORTED:
        output = tmp_path_factory.mktemp("onnx-artifact") / f"tiny-onnx-{sequence_length}"
        api.export(onnx_recipe(checkpoint, sequence_length), output)
        _EXPORTED[key] = output
    return _EXPORTED[key]


def copy_artifact(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def largest_file(path: Path) -> Path:
    return max((p for p in path.rglob("*") if p.is_file() and p.name != artifact.MANIFEST_NAME),
               key=lambda p: p.stat().st_size)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(path: Path, **changes) -> None:
    manifest_path = path / artifact.MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data.update(changes)
    manifest_path.write_text(json.dumps(data))


def llmopt_subprocess(args: list[str], env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m``-style run of the CLI in a fresh interpreter (real stdout/stderr, real exit code)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    code = "import sys; from llmopt.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT, **kwargs)


def assert_one_line_error(stderr: str) -> str:
    """stderr holds one 'error:' line (plus an optional 'hint:' line) and no traceback; returns the error.

    Progress lines ('llmopt: ...' or, with --log-format json, one JSON event per line) may come before it.
    """
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not _is_json_event(line)]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    others = [line for line in lines if not line.startswith(("error: ", "hint: ", "llmopt: "))]
    assert not others, stderr
    assert sum(line.startswith("hint: ") for line in lines) <= 1, stderr
    return errors[0]


def _is_json_event(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str = "256k") -> Iterator[Path]:
    """A tiny tmpfs to fill up (needs root); skips the test where it cannot be mounted."""
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here (needs root): {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# -- the CLI in process (the hardware targets' plan and error tests) -------------------------------


def dry_run(capsys, *args: str) -> tuple[int, dict | None, str]:
    """``llmopt export ARGS --dry-run --json`` in process: (exit code, the plan's JSON or None, stderr)."""
    from llmopt.cli.main import main

    code = main(["export", *args, "--dry-run", "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def failing(capsys, *args: str) -> tuple[int, str]:
    """``llmopt ARGS`` in process: (exit code, stderr)."""
    from llmopt.cli.main import main

    code = main(list(args))
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, *needles: str) -> None:
    """The first stderr line is the error, holding every needle; no traceback."""
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith("error: ")
    for needle in needles:
        assert needle in first, first
