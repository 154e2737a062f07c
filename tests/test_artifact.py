"""The artifact contract: atomic write, manifest checks, hashes (no backend needed)."""

from __future__ import annotations

import json

import pytest

from llmopt import artifact
from llmopt.artifact import MANIFEST_NAME, Manifest
from llmopt.errors import ArtifactError, UsageError


def _manifest() -> Manifest:
    return Manifest(target="onnx", recipe={"model": {"id": "m"}}, source={"model": "m"}, backend_versions={"onnxruntime": "1.32.0"},
                    shapes={"batch_size": 2, "sequence_length": 64, "static": False}, precision="fp32", quantization={})


def _build(output, body=b"weights", force=False):
    with artifact.staging(output, force=force) as workdir:
        (workdir / "model.bin").write_bytes(body)
        (workdir / "sub").mkdir()
        (workdir / "sub" / "config.json").write_text("{}")
        artifact.finalize(workdir, _manifest())


def test_written_atomically_with_hashes(tmp_path):
    output = tmp_path / "art"
    _build(output)
    manifest = artifact.load(output)
    assert set(manifest.files) == {"model.bin", "sub/config.json"}
    assert manifest.batch_size == 2 and manifest.sequence_length == 64
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no partial directory left behind


def test_failure_leaves_nothing(tmp_path):
    output = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with artifact.staging(output) as workdir:
            (workdir / "model.bin").write_bytes(b"half")
            raise RuntimeError("compiler crashed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    output = tmp_path / "art"
    _build(output)
    with pytest.raises(UsageError, match="already exists"):
        _build(output)


def test_failed_force_rebuild_keeps_old_artifact(tmp_path):
    output = tmp_path / "art"
    _build(output, body=b"old")
    with pytest.raises(RuntimeError):
        with artifact.staging(output, force=True) as workdir:
            (workdir / "model.bin").write_bytes(b"new")
            raise RuntimeError("boom")
    assert (output / "model.bin").read_bytes() == b"old"
    artifact.load(output)


def test_force_replaces(tmp_path):
    output = tmp_path / "art"
    _build(output, body=b"old")
    _build(output, body=b"new", force=True)
    assert (output / "model.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_flipped_byte_is_refused(tmp_path):
    output = tmp_path / "art"
    _build(output)
    data = bytearray((output / "model.bin").read_bytes())
    data[0] ^= 0xFF
    (output / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="'model.bin' is corrupt"):
        artifact.load(output)


def test_missing_file_is_refused(tmp_path):
    output = tmp_path / "art"
    _build(output)
    (output / "sub" / "config.json").unlink()
    with pytest.raises(ArtifactError, match="'sub/config.json' is missing"):
        artifact.load(output)


def test_newer_format_is_refused(tmp_path):
    output = tmp_path / "art"
    _build(output)
    data = json.loads((output / MANIFEST_NAME).read_text())
    data["format_version"] = artifact.FORMAT_VERSION + 1
    (output / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="newer than this llmopt reads"):
        artifact.load(output)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="llmopt.json is missing"):
        artifact.load(tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        artifact.load(tmp_path / "nope")


def test_backend_version_check(tmp_path):
    manifest = _manifest()
    artifact.check_backend_versions(tmp_path, manifest, {"onnxruntime": "1.32.1"}, "onnx")
    artifact.check_backend_versions(tmp_path, manifest, {"onnxruntime": "1.33.0"}, "onnx")
    with pytest.raises(ArtifactError, match="built with onnxruntime 1.32.0, this machine has 1.20.0"):
        artifact.check_backend_versions(tmp_path, manifest, {"onnxruntime": "1.20.0"}, "onnx")
    with pytest.raises(ArtifactError, match="not installed"):
        artifact.check_backend_versions(tmp_path, manifest, {"onnxruntime": None}, "onnx")


def test_partials_of_dead_exports_are_swept(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])  # its pid is gone once waited for
    dead.wait()
    stale = tmp_path / f"art{artifact.PARTIAL_MARKER}{dead.pid}"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    _build(tmp_path / "art")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
