"""``llmopt verify`` and ``llmopt inspect`` on real artifacts (the PyTorch runner needs no exporter)."""

from __future__ import annotations

import json

import pytest

from llmopt import artifact, doctor
from llmopt.cli.main import main
from llmopt.errors import ArtifactError

from tests._hardening import (assert_one_line_error, copy_artifact, edit_manifest, exported_onnx, flip_byte,
                              largest_file, pytorch_artifact)


@pytest.fixture(scope="module")
def good(tiny_llama, tmp_path_factory):
    return pytorch_artifact(tiny_llama, tmp_path_factory.mktemp("verify") / "art")


@pytest.fixture
def art(good, tmp_path):
    """A private copy each test may damage."""
    return copy_artifact(good, tmp_path / "art")


def test_verify_ok(good, capsys):
    assert main(["verify", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {good}") and "files verified" in out


def test_verify_run_generates(good, capsys):
    assert main(["verify", "--run", "--json", str(good)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["generated"]["tokens"] >= 1
    assert result["files_verified"] == len(artifact.read_manifest(good).files)


def test_verify_flipped_byte_names_file(art, capsys):
    weights = largest_file(art)
    flip_byte(weights)
    assert main(["verify", str(art)]) == 1
    line = assert_one_line_error(capsys.readouterr().err)
    assert weights.name in line and "corrupt" in line


def test_verify_json_failure(art, capsys):
    (art / "tokenizer.json").unlink()
    assert main(["verify", "--json", str(art)]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["ok"] is False and "tokenizer.json" in result["error"] and "missing" in result["error"]
    assert_one_line_error(captured.err)


def test_verify_backend_too_old(art, capsys):
    edit_manifest(art, backend_versions={"torch": "99.1.0", "transformers": "4.0.0"})
    assert main(["verify", str(art)]) == 1
    line = assert_one_line_error(capsys.readouterr().err)
    assert "built with torch 99.1.0, this machine has" in line


def test_verify_newer_format_refused(art, capsys):
    edit_manifest(art, format_version=artifact.FORMAT_VERSION + 1)
    for command in ("verify", "inspect", "run"):
        args = [command, str(art)] + (["hello"] if command == "run" else [])
        assert main(args) == 1
        line = assert_one_line_error(capsys.readouterr().err)
        assert f"manifest format {artifact.FORMAT_VERSION + 1} is newer than this llmopt reads" in line


def test_verify_not_an_artifact(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 1
    assert "llmopt.json is missing" in assert_one_line_error(capsys.readouterr().err)
    assert main(["verify", str(tmp_path / "nope")]) == 1
    assert "does not exist" in assert_one_line_error(capsys.readouterr().err)


def test_check_artifact_api(good, art):
    result = doctor.check_artifact(good)
    assert result["target"] == "pytorch" and set(result["backend_versions"]) == {"torch", "transformers"}
    (art / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="config.json"):
        doctor.check_artifact(art)


def test_inspect_readable(good, capsys):
    assert main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    for expected in ("target", "pytorch", "sequence_length=32", "model.safetensors", "recipe", "backends"):
        assert expected in out


def test_inspect_json_is_the_manifest(good, capsys):
    assert main(["inspect", "--json", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == json.loads((good / artifact.MANIFEST_NAME).read_text())


def test_inspect_does_not_rehash(art, capsys):
    flip_byte(largest_file(art))  # inspect is the cheap look; verify is the check
    assert main(["inspect", "--json", str(art)]) == 0


def test_verify_onnx_artifact(tiny_llama, tmp_path_factory, capsys):
    onnx = exported_onnx(tiny_llama, tmp_path_factory)
    assert main(["verify", "--run", "--json", str(onnx)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["target"] == "onnx" and result["generated"]["tokens"] >= 1
    assert result["backend_versions"]  # the runner's backend, checked against the recipe's build
