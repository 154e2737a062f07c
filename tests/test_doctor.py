"""``llmopt doctor``: targets and versions from package metadata, hardware, known-bad combinations."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from llmopt import doctor
from llmopt._deps import version_of
from llmopt.cli.main import main

from tests._hardening import assert_one_line_error, llmopt_subprocess


def test_json_report(capsys):
    code = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["ok"] else 1)
    targets = {target["name"]: target for target in report["targets"]}
    assert set(targets) == set(doctor.EXTRAS) and {"onnx", "openvino", "neuron", "tensorrt"} <= set(targets)
    for target in targets.values():
        for package in target["packages"]:
            assert package["version"] == version_of(package["name"])
        if not target["installed"]:
            assert target["install"] and (target["missing"] or target["mismatched"])
    assert targets["neuron"]["install"].startswith("make install-neuron")
    cpu = report["cpu"]
    assert cpu["logical_cores"] == os.cpu_count() and isinstance(cpu["flags"], list) and cpu["model"]
    assert isinstance(report["gpus"], (list, str)) and isinstance(report["neuron_devices"], list)


def test_installed_targets_match_this_environment(capsys):
    main(["doctor", "--json"])
    targets = {t["name"]: t for t in json.loads(capsys.readouterr().out)["targets"]}
    assert targets["pytorch"]["installed"] == bool(version_of("torch") and version_of("transformers"))
    if version_of("onnxruntime-genai") and version_of("optimum-onnx"):
        assert targets["onnx"]["installed"]
    if version_of("tensorrt-llm") is None:
        assert not targets["tensorrt"]["installed"] and any("tensorrt-llm" in m for m in targets["tensorrt"]["missing"])


def test_text_report(capsys):
    main(["doctor"])
    out = capsys.readouterr().out
    for expected in ("targets", "cpu", "flags", "gpus", "neuron", "pytorch", "openvino"):
        assert expected in out
    if not version_of("onnxruntime-gpu"):
        assert "'llmopt[gpu]'" in out  # rich markup must not eat the [extra]


def test_imports_no_backend():
    code = ("import sys; from llmopt.cli.main import main; main(['doctor', '--json']); "
            "print([m for m in ('torch', 'transformers', 'onnxruntime', 'openvino', 'onnx') if m in sys.modules], "
            "file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_known_bad_rows():
    assert doctor.known_bad_combinations({}) == []
    found = doctor.known_bad_combinations({"transformers": "5.0.0", "optimum-onnx": "0.1.0"})
    assert len(found) == 1 and "transformers 5" in found[0]["why"]
    assert doctor.known_bad_combinations({"transformers": "5.0.0", "optimum-onnx": "0.2.0"}) == []
    assert doctor.known_bad_combinations({"transformers": "4.57.6", "optimum-onnx": "0.1.0"}) == []
    assert len(doctor.known_bad_combinations({"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"})) == 1
    assert len(doctor.known_bad_combinations({"openvino": "2026.4.1", "openvino-tokenizers": "2025.2.0.0"})) == 1
    assert doctor.known_bad_combinations({"openvino": "2026.4.1", "openvino-tokenizers": "2026.4.1.0",
                                          "openvino-genai": "2026.4.1.0"}) == []


@pytest.mark.parametrize("version, specifier, expected", [
    ("2.13.0+cpu", ">=2.4", True), ("4.57.6", "<5,>=4.51", True), ("5.0.0rc1", "<5", False),
    ("0.20.0", "==0.20.0", True), ("0.20.1", "==0.20.0", False), ("1.0", "", True), ("2026.4.1.0", ">=2025.2", True),
    ("1.4.2", "~=1.4", True), ("2.0", "~=1.4", False), ("3.4.0", "!=3.4", False),
])
def test_satisfies(version, specifier, expected):
    assert doctor.satisfies(version, specifier) is expected


def _fake_distribution(directory, name, version):
    info = directory / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_known_bad_installed_exits_1(tmp_path):
    """A real (metadata-only) installed distribution, not a patched lookup: onnxruntime-gpu beside onnxruntime."""
    if not version_of("onnxruntime"):
        pytest.skip("needs onnxruntime installed: pip install 'llmopt[onnx]'")
    _fake_distribution(tmp_path, "onnxruntime-gpu", "1.22.0")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    result = llmopt_subprocess(["doctor"], env=env, timeout=120)
    assert result.returncode == 1
    line = assert_one_line_error(result.stderr)
    assert "known-bad combination installed" in line and "onnxruntime-gpu 1.22.0" in line
    assert "problem" in result.stdout
    result = llmopt_subprocess(["doctor", "--json"], env=env, timeout=120)
    assert result.returncode == 1 and json.loads(result.stdout)["ok"] is False


def test_nvidia_smi_parsed(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 570.86.15, 9.0'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert doctor.nvidia_gpus() == [{"name": "NVIDIA H100 80GB HBM3", "memory.total": "81559 MiB",
                                     "driver_version": "570.86.15", "compute_cap": "9.0"}]
    script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert isinstance(doctor.nvidia_gpus(), str)  # a one-line reason, not an exception
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert doctor.nvidia_gpus() == []
