"""Every architecture in llmopt.architectures, as a tiny random checkpoint, on both CPU targets.

Each export runs the parity gate (teacher-forced logits against PyTorch); here it must be exact,
and greedy generation must give PyTorch's tokens. An architecture outside the registry is refused
in one line before any work.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from llmopt import api, architectures
from llmopt.artifact import read_manifest
from llmopt.runners.base import SamplingConfig
from tests import architectures as tiny_architectures
from tests._hardening import assert_one_line_error, llmopt_subprocess
from tests.conftest import PROMPTS, ROOT, pytorch_results

TARGETS = [pytest.param("onnx", marks=pytest.mark.onnx), pytest.param("openvino", marks=pytest.mark.openvino)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_llama, tmp_path_factory):
    built: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = tiny_architectures.build(model_type, tiny_llama, tmp_path_factory.mktemp(model_type))
        return built[model_type]

    return build


def test_every_registered_architecture_has_a_tiny_checkpoint_here():
    assert set(tiny_architectures.SPECIFIC) == set(architectures.ARCHITECTURES)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model_type", list(architectures.ARCHITECTURES))
def test_architecture_exports_with_exact_parity(model_type, target, tiny_checkpoint, build_artifact):
    checkpoint = tiny_checkpoint(model_type)
    path = build_artifact(checkpoint, target=target, **{"shapes.sequence_length": 128})
    manifest = read_manifest(path)
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == model_type
    assert manifest.validation["top1_agreement"] == 1.0
    assert manifest.validation["mean_kl"] < 1e-6

    results = api.run(path, PROMPTS[:2], temperature=0.0, max_new_tokens=12)
    expected = pytorch_results(checkpoint, manifest, PROMPTS[:2], SamplingConfig(max_new_tokens=12))
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert len(set(results[1].token_ids)) > 1  # not one token repeated: the comparison means something


def test_an_unlisted_architecture_is_refused_in_one_line_before_any_work(tiny_llama, tmp_path):
    from llmopt.errors import UsageError
    from llmopt.recipe import resolve

    model = tmp_path / "gpt2-like"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    started = time.perf_counter()
    with pytest.raises(UsageError, match="model_type 'gpt2'"):
        api.export(resolve(None, {"model.id": str(model), "target": "openvino"}), tmp_path / "in-process")
    assert time.perf_counter() - started < 1.0  # before the backend is imported: no tracing, no conversion

    done = llmopt_subprocess(["export", "-m", str(model), "--target", "openvino", "-o", str(tmp_path / "out")])
    assert done.returncode == 2
    error = assert_one_line_error(done.stderr)
    assert error.startswith("error: model_type 'gpt2'") and "gemma3_text" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "in-process").exists()


def test_the_readme_and_doctor_list_the_registry():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert architectures.markdown_table() in readme
    report = json.loads(llmopt_subprocess(["doctor", "--json"]).stdout)
    assert report["architectures"] == list(architectures.ARCHITECTURES)
    assert "gemma3_text" in llmopt_subprocess(["doctor"]).stdout
