"""Every foundation error path through the CLI: its exit code, one line on stderr (plus an optional
'hint:' line), never a traceback, unless LLMOPT_DEBUG=1 asks for it."""

from __future__ import annotations

import json
import sys

import pytest

from llmopt.cli.main import main

from tests._hardening import (assert_one_line_error, copy_artifact, edit_manifest, exported_onnx, flip_byte,
                              largest_file, llmopt_subprocess, pytorch_artifact)
from tests.conftest import write_recipe

# The top-level modules each target's extra installs; hiding them is how Python reports them missing.
TARGET_MODULES = {
    "onnx": ("onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir"),
    "openvino": ("openvino", "openvino_genai", "openvino_tokenizers", "nncf", "optimum.intel"),
}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["-q", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails(capsys, expected_code: int, *args: str) -> str:
    code, out, err = cli(capsys, *args)
    assert code == expected_code, err
    return assert_one_line_error(err)


@pytest.fixture(scope="module")
def pt_artifact(tiny_llama, tmp_path_factory):
    return pytorch_artifact(tiny_llama, tmp_path_factory.mktemp("errors") / "art")


# -- export: model, architecture, target ---------------------------------------------------------


def test_missing_model_path(capsys, tmp_path):
    line = fails(capsys, 2, "export", "-m", str(tmp_path / "nope"), "-t", "onnx", "-o", str(tmp_path / "out"))
    assert "does not exist" in line and str(tmp_path / "nope") in line
    assert not (tmp_path / "out").exists()


def test_model_dir_without_config(capsys, tmp_path):
    (tmp_path / "ckpt").mkdir()
    line = fails(capsys, 2, "export", "-m", str(tmp_path / "ckpt"), "-t", "onnx", "-o", str(tmp_path / "out"))
    assert "no config.json" in line


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    line = fails(capsys, 2, "export", "-m", str(tmp_path / "bert"), "-t", "onnx", "-o", str(tmp_path / "out"))
    assert "model_type 'bert'" in line and "supported: llama" in line


@pytest.mark.parametrize("target", sorted(TARGET_MODULES))
def test_target_not_installed(capsys, tmp_path, tiny_llama, monkeypatch, target):
    for module in TARGET_MODULES[target]:
        monkeypatch.setitem(sys.modules, module, None)  # what Python does for a module that is not installed
    code, _, err = cli(capsys, "export", "-m", str(tiny_llama), "-t", target, "-o", str(tmp_path / "out"))
    assert code == 1, err
    line = assert_one_line_error(err)
    assert f"the '{target}' target needs" in line and "not installed" in line
    assert f"hint: install it with: pip install 'llmopt[{target}]'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target, hint", [("neuron", "make install-neuron"), ("tensorrt", "make install-tensorrt")])
def test_hardware_target_really_missing(capsys, tmp_path, tiny_llama, target, hint):
    from llmopt._deps import version_of

    if version_of("optimum-neuron" if target == "neuron" else "tensorrt-llm"):
        pytest.skip(f"{target} is installed here")
    line = fails(capsys, 1, "export", "-m", str(tiny_llama), "-t", target, "-o", str(tmp_path / "out"))
    assert f"the '{target}' target needs" in line and hint in line
    assert not (tmp_path / "out").exists()


def test_missing_backend_at_run(capsys, tiny_llama, tmp_path_factory, monkeypatch):
    onnx = exported_onnx(tiny_llama, tmp_path_factory)
    for module in TARGET_MODULES["onnx"]:
        monkeypatch.setitem(sys.modules, module, None)
    line = fails(capsys, 1, "run", str(onnx), "hello")
    assert "not installed" in line


# -- recipes -------------------------------------------------------------------------------------


def test_unknown_field_names_field_and_accepted(capsys, tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": str(tiny_llama), "target": "onnx",
                                                "shapes": {"sequence_lenght": 64}})
    line = fails(capsys, 2, "export", "--config", str(recipe), "--dry-run")
    assert "shapes.sequence_lenght" in line and "unknown field" in line
    assert "accepted: batch_size, sequence_length, static" in line


def test_unknown_top_level_section(capsys, tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": str(tiny_llama), "target": "onnx", "quantisation": {}})
    line = fails(capsys, 2, "export", "--config", str(recipe), "--dry-run")
    assert "'quantisation'" in line and "accepted:" in line and "quantization" in line


@pytest.mark.parametrize("field, value, words", [
    ("shapes.batch_size", "four", ["shapes.batch_size", "integer"]),
    ("shapes.batch_size", "0", ["shapes.batch_size", "greater than or equal to 1"]),
    ("precision.dtype", "fp8", ["precision.dtype", "fp32"]),
    ("validation.enabled", "[1, 2]", ["validation.enabled", "boolean"]),
])
def test_wrong_type(capsys, tiny_llama, field, value, words):
    line = fails(capsys, 2, "export", "-m", str(tiny_llama), "-t", "onnx", "--set", f"{field}={value}", "--dry-run")
    for word in words:
        assert word in line


def test_unknown_target(capsys, tiny_llama):
    line = fails(capsys, 2, "export", "-m", str(tiny_llama), "-t", "tpu", "--dry-run")
    assert "unknown target 'tpu'" in line and "onnx" in line


def test_recipe_file_problems(capsys, tmp_path):
    assert "not found" in fails(capsys, 2, "export", "--config", str(tmp_path / "none.yaml"), "--dry-run")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    assert "not valid YAML" in fails(capsys, 2, "export", "--config", str(tmp_path / "bad.yaml"), "--dry-run")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "must be a mapping" in fails(capsys, 2, "export", "--config", str(tmp_path / "list.yaml"), "--dry-run")
    assert "expected FIELD=VALUE" in fails(capsys, 2, "export", "--set", "novalue", "--dry-run")
    assert "required but not given" in fails(capsys, 2, "export", "-t", "onnx", "--dry-run")


def test_output_required_and_existing_output(capsys, tmp_path, tiny_llama):
    assert "-o/--output is required" in fails(capsys, 2, "export", "-m", str(tiny_llama), "-t", "onnx")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    line = fails(capsys, 2, "export", "-m", str(tiny_llama), "-t", "onnx", "-o", str(tmp_path / "out"))
    assert "already exists" in line
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# -- artifacts -----------------------------------------------------------------------------------


def test_corrupt_artifact(capsys, pt_artifact, tmp_path):
    art = copy_artifact(pt_artifact, tmp_path / "art")
    weights = largest_file(art)
    flip_byte(weights)
    for command in (["run", str(art), "hello"], ["verify", str(art)]):
        line = fails(capsys, 1, *command)
        assert f"file '{weights.name}' is corrupt" in line


def test_not_an_artifact(capsys, tmp_path, tiny_llama):
    assert "llmopt.json is missing" in fails(capsys, 1, "run", str(tiny_llama), "hello")
    assert "does not exist" in fails(capsys, 1, "run", str(tmp_path / "nope"), "hello")
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in fails(capsys, 1, "run", str(tmp_path / "file"), "hello")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "llmopt.json").write_text("{\"target\": ")
    assert "not valid JSON" in fails(capsys, 1, "run", str(tmp_path / "bad"), "hello")
    (tmp_path / "bad" / "llmopt.json").write_text("{\"format_version\": 1}")
    assert "manifest lacks" in fails(capsys, 1, "run", str(tmp_path / "bad"), "hello")


def test_backend_version_mismatch_pytorch(capsys, pt_artifact, tmp_path):
    from llmopt._deps import version_of

    art = copy_artifact(pt_artifact, tmp_path / "art")
    edit_manifest(art, backend_versions={"torch": "99.0.0", "transformers": version_of("transformers")})
    code, _, err = cli(capsys, "run", str(art), "hello")
    assert code == 1
    assert f"was built with torch 99.0.0, this machine has {version_of('torch')}" in assert_one_line_error(err)
    assert "hint: re-export it here or install torch==99.0.0" in err


def test_backend_version_mismatch_onnx(capsys, tiny_llama, tmp_path_factory, tmp_path):
    from llmopt import artifact
    from llmopt._deps import version_of

    art = copy_artifact(exported_onnx(tiny_llama, tmp_path_factory), tmp_path / "art")
    built = artifact.read_manifest(art).backend_versions
    name = next(n for n in ("onnxruntime-genai", "onnxruntime") if n in built)
    edit_manifest(art, backend_versions={**built, name: "99.0.0"})
    for command in (["run", str(art), "hello"], ["verify", str(art)]):
        line = fails(capsys, 1, *command)
        assert f"built with {name} 99.0.0, this machine has {version_of(name)}" in line


# -- run -----------------------------------------------------------------------------------------


def test_prompt_problems(capsys, tiny_llama, tmp_path_factory):
    onnx = exported_onnx(tiny_llama, tmp_path_factory)
    line = fails(capsys, 2, "run", str(onnx), "word " * 200)
    assert "tokens but the artifact accepts at most 31" in line
    assert "no prompt given" in fails(capsys, 2, "run", str(onnx))
    assert "prompts file" in fails(capsys, 2, "run", str(onnx), "--prompts-file", "/nonexistent.txt")


def test_bad_log_format(capsys):
    assert "--log-format 'xml'" in fails(capsys, 2, "--log-format", "xml", "doctor")


@pytest.mark.parametrize("args, words", [
    (["export", "-m", "x", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    (["export", "--bogus"], "No such option: --bogus"),
    (["run"], "Missing argument 'artifact'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_flag_errors_are_one_line_with_the_help_command(capsys, args, words):
    """The parser's own errors (bad values, unknown options) look like every other error."""
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert words in assert_one_line_error(err)
    command = "llmopt " + args[0] if args[0] != "frobnicate" else "llmopt"
    assert f"hint: see '{command} --help'" in err


def test_debug_shows_traceback(tmp_path):
    args = ["export", "-m", str(tmp_path / "nope"), "-t", "onnx", "-o", str(tmp_path / "out")]
    quiet = llmopt_subprocess(args, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    loud = llmopt_subprocess(args, env={"LLMOPT_DEBUG": "1"}, timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UsageError" in loud.stderr


# -- machine-readable progress -------------------------------------------------------------------


def test_json_log_format_on_a_real_export(tiny_llama, tmp_path):
    """--log-format json: stderr is one JSON object per line (resolve, export, validate, write with
    timings); stdout holds only the result. --quiet leaves stderr empty."""
    args = ["export", "-m", str(tiny_llama), "-t", "onnx", "--sequence-length", "32", "--no-cache"]
    result = llmopt_subprocess(["--log-format", "json", *args, "-o", str(tmp_path / "a"), "--json"])
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert all(isinstance(event, dict) and {"time", "level", "event", "message"} <= set(event) for event in events)
    for step in ("resolve", "export", "validate", "write"):
        kinds = [event for event in events if event.get("step") == step]
        assert [event["event"] for event in kinds] == ["start", "end"], step
        assert kinds[1]["seconds"] >= 0.0
    validate_end = next(e for e in events if e.get("step") == "validate" and e["event"] == "end")
    assert validate_end["fields"]["passed"] is True
    order = [event["step"] for event in events if event["event"] == "start"]
    assert order.index("resolve") < order.index("export") < order.index("validate") < order.index("write")
    out_lines = result.stdout.splitlines()
    assert len(out_lines) == 1 and json.loads(out_lines[0])["output"] == str(tmp_path / "a")

    text = llmopt_subprocess(["--log-format", "json", *args, "-o", str(tmp_path / "b")])
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 1 and text.stdout.startswith(str(tmp_path / "b"))

    quiet = llmopt_subprocess(["--log-format", "json", "--quiet", *args, "-o", str(tmp_path / "c"), "--json"])
    assert quiet.returncode == 0 and quiet.stderr == "" and json.loads(quiet.stdout)["output"] == str(tmp_path / "c")
