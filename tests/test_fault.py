"""Faults on purpose: kill -9 at each point of an export, races, a full disk, corrupt artifacts.

What must hold: the output path holds the old artifact or nothing, never a partial one; the next
export succeeds; every failure is one line with its exit code. Kill points come from
``LLMOPT_FAULT_SLEEP_AT`` (llmopt/events.py), which makes the export log a warning and sleep at a
step's start (or ``<step>:end``) until the test kills it, and from watching the partial directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmopt import artifact
from llmopt.cli.main import main

from tests._hardening import (ROOT, assert_one_line_error, copy_artifact, edit_manifest, exported_onnx, flip_byte,
                              largest_file, llmopt_subprocess, small_tmpfs)

pytestmark = pytest.mark.fault

KILL_TIMEOUT_S = 240  # per killed export: it must reach its kill point within this
CODE = "import sys; from llmopt.cli.main import main; sys.exit(main(sys.argv[1:]))"


def _export_args(checkpoint: Path, output: Path, *flags: str) -> list[str]:
    return ["--log-format", "json", "export", "-m", str(checkpoint), "-t", "onnx", "--sequence-length", "32",
            "-o", str(output), *flags]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "LLMOPT_CACHE_DIR": str(tmp_path / "llmopt-cache"), **extra}


def kill_export_at(args: list[str], env: dict[str, str], reached) -> subprocess.CompletedProcess:
    """Start an export, SIGKILL it as soon as ``reached(events, pid)`` is true; return what it printed."""
    process = subprocess.Popen([sys.executable, "-c", CODE, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while True:
            events = [json.loads(line) for line in list(lines) if line.startswith("{")]
            if reached(events, process.pid):
                break
            if process.poll() is not None:
                pytest.fail(f"export ended (rc {process.returncode}) before its kill point:\n{''.join(lines)}")
            if time.monotonic() > deadline:
                pytest.fail(f"export did not reach its kill point in {KILL_TIMEOUT_S}s:\n{''.join(lines)}")
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        reader.join(10)
    assert process.returncode == -signal.SIGKILL
    return subprocess.CompletedProcess(args, process.returncode, "", "".join(lines))


def at_hook(point: str):
    """The export logged that it is sleeping at ``point`` (``step`` means ``step:start``)."""
    wanted = point if ":" in point else f"{point}:start"
    return lambda events, pid: any(e.get("fields", {}).get("fault") == wanted for e in events)


def first_file_written(output: Path):
    """Mid-export: the backend has started writing into the partial directory."""
    def reached(events, pid):
        partial = output.with_name(f"{output.name}{artifact.PARTIAL_MARKER}{pid}")
        return partial.is_dir() and any(p.is_file() and p.stat().st_size > 0 for p in partial.iterdir())
    return reached


def leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(output.name) and p != output)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_artifact(tiny_llama, tmp_path_factory):
    return exported_onnx(tiny_llama, tmp_path_factory)


@pytest.fixture(scope="module")
def warm_cache(tiny_llama, tmp_path_factory, old_artifact):
    """A cache holding the standard export, so follow-up exports (and restore kills) are fast."""
    directory = tmp_path_factory.mktemp("warm-cache")
    result = llmopt_subprocess(_export_args(tiny_llama, directory / "seed", "--cache-dir", str(directory / "c")))
    assert result.returncode == 0, result.stderr
    return directory / "c"


def _follow_up(tiny_llama, output, warm_cache, tmp_path, *flags):
    result = llmopt_subprocess(_export_args(tiny_llama, output, "--cache-dir", str(warm_cache), *flags),
                               env={"LLMOPT_CACHE_DIR": str(tmp_path / "llmopt-cache")})
    assert result.returncode == 0, result.stderr
    artifact.load(output)


# -- kill -9 --------------------------------------------------------------------------------------

# point -> (LLMOPT_FAULT_SLEEP_AT value, or None to kill once the backend writes its first file; cache use)
KILL_POINTS = {
    "partial-dir-created": ("export", "none"),
    "mid-export-writing": (None, "none"),
    "during-validation": ("validate", "none"),
    "before-rename": ("write:end", "none"),  # body and manifest complete in the partial directory
    "storing-in-cache": ("cache-store", "empty"),
    "restoring-from-cache": ("restore", "warm"),
}
# (point, mode): "fresh" exports to a new path, "replace" with --force over an existing artifact.
KILL_CASES = [(point, "fresh") for point in KILL_POINTS] + [
    ("partial-dir-created", "replace"), ("before-rename", "replace"), ("restoring-from-cache", "replace"),
]


@pytest.mark.parametrize("point, mode", KILL_CASES, ids=[f"{p}-{m}" for p, m in KILL_CASES])
def test_kill_leaves_old_or_nothing(point, mode, tiny_llama, tmp_path, old_artifact, warm_cache):
    hook, cache_use = KILL_POINTS[point]
    output = tmp_path / "out"
    force = ["--force"] if mode == "replace" else []
    if mode == "replace":
        copy_artifact(old_artifact, output)
    before = (output / artifact.MANIFEST_NAME).read_bytes() if mode == "replace" else None
    cache_flags = {"none": ["--no-cache"], "empty": ["--cache-dir", str(tmp_path / "empty-cache")],
                   "warm": ["--cache-dir", str(warm_cache)]}[cache_use]
    env = _env(tmp_path, **({"LLMOPT_FAULT_SLEEP_AT": hook} if hook else {}))

    killed = kill_export_at(_export_args(tiny_llama, output, *cache_flags, *force), env,
                            at_hook(hook) if hook else first_file_written(output))

    if mode == "fresh":
        assert not output.exists(), killed.stderr
    else:
        assert (output / artifact.MANIFEST_NAME).read_bytes() == before
        artifact.load(output)  # the old artifact, intact and every file verified
    # a kill leaves at most the killed pid's partial directory beside the output, never at it
    assert all(artifact.PARTIAL_MARKER in name for name in leftovers(output)), leftovers(output)
    if cache_use == "empty":
        entries = [p for p in (tmp_path / "empty-cache").iterdir() if not p.name.startswith((".", "source-"))]
        assert entries == []  # the cache never holds a half-stored entry
    if cache_use == "warm":
        artifact.load(next(p for p in warm_cache.iterdir() if not p.name.startswith((".", "source-"))))

    if point == "before-rename" and mode == "fresh":
        # a full compile to the same path, beside the killed export's finished-but-unrenamed directory
        assert len(leftovers(output)) == 1
        result = llmopt_subprocess(["-q", *_export_args(tiny_llama, output, "--no-cache")], env=_env(tmp_path))
        assert result.returncode == 0, result.stderr
        assert artifact.load(output).validation["passed"]
    else:
        _follow_up(tiny_llama, output, warm_cache, tmp_path, *force)


# -- races ----------------------------------------------------------------------------------------


def test_two_exports_to_one_output(tiny_llama, tmp_path, old_artifact):
    """Started together, no --force: one wins, the other fails cleanly (exit 2), the output is valid."""
    output = tmp_path / "out"
    jobs = [subprocess.Popen([sys.executable, "-c", CODE, "-q", *_export_args(tiny_llama, output, "--no-cache")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=ROOT)
            for _ in range(2)]
    results = [(job, *job.communicate(timeout=KILL_TIMEOUT_S)) for job in jobs]
    codes = sorted(job.returncode for job, _, _ in results)
    assert codes == [0, 2], [err for _, _, err in results]
    loser_err = next(err for job, _, err in results if job.returncode == 2)
    assert "already exists" in assert_one_line_error(loser_err)
    artifact.load(output)
    assert leftovers(output) == []


# -- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "small") as mount_point:
        yield mount_point


def test_full_disk_is_one_line_and_leaves_nothing(tiny_llama, tmp_path, small_disk, old_artifact):
    output = small_disk / "out"
    result = llmopt_subprocess(["-q", *_export_args(tiny_llama, output, "--no-cache")], env=_env(tmp_path))
    assert result.returncode == 1, result.stderr
    line = assert_one_line_error(result.stderr)
    assert line.startswith(f"error: no space left on device writing {output}")
    assert list(small_disk.iterdir()) == []


def test_full_cache_disk_does_not_fail_the_export(tiny_llama, tmp_path, small_disk, old_artifact):
    output = tmp_path / "out"
    result = llmopt_subprocess(_export_args(tiny_llama, output, "--cache-dir", str(small_disk / "cache"), "--no-validate"),
                               env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    artifact.load(output)
    warnings = [json.loads(l) for l in result.stderr.splitlines() if l.startswith("{") and '"warning"' in l]
    assert any("could not store the artifact in the cache" in w["message"] for w in warnings)
    assert [p.name for p in (small_disk / "cache").iterdir() if not p.name.startswith("source-")] == []


# -- corrupt and foreign artifacts ----------------------------------------------------------------


@pytest.fixture
def onnx_copy(old_artifact, tmp_path):
    return copy_artifact(old_artifact, tmp_path / "art")


@pytest.mark.parametrize("which", ["largest", "graph", "tokenizer"])
def test_flipped_byte_refused_by_run_and_verify(onnx_copy, capsys, which):
    path = {"largest": largest_file(onnx_copy), "graph": onnx_copy / "model.onnx",
            "tokenizer": onnx_copy / "tokenizer.json"}[which]
    flip_byte(path)
    for command in (["run", str(onnx_copy), "hello"], ["verify", str(onnx_copy)], ["verify", "--run", str(onnx_copy)]):
        assert main(["-q", *command]) == 1
        line = assert_one_line_error(capsys.readouterr().err)
        assert f"file '{path.name}' is corrupt" in line


def test_newer_manifest_format_refused(onnx_copy, capsys):
    edit_manifest(onnx_copy, format_version=artifact.FORMAT_VERSION + 1)
    for command in (["run", str(onnx_copy), "hello"], ["verify", str(onnx_copy)], ["inspect", str(onnx_copy)]):
        assert main(["-q", *command]) == 1
        err = capsys.readouterr().err
        assert f"is newer than this llmopt reads ({artifact.FORMAT_VERSION})" in assert_one_line_error(err)
        assert "hint: upgrade llmopt or re-export the artifact" in err
