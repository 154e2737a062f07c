"""A backend's exception ends as one line naming the step, the backend, the model_type and its own message."""

from __future__ import annotations

import json
import shutil

import pytest

from tests import architectures as tiny_architectures
from tests._hardening import assert_one_line_error, llmopt_subprocess


@pytest.fixture(scope="module")
def mismatched_llama(tiny_llama, tmp_path_factory):
    """config.json says intermediate_size 96; the weights are 128 wide."""
    model = tmp_path_factory.mktemp("mismatched")
    shutil.copytree(tiny_llama, model, dirs_exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    return model


@pytest.mark.parametrize("target, backend", [
    pytest.param("onnx", "the onnxruntime-genai model builder", marks=pytest.mark.onnx),
    pytest.param("openvino", "optimum-intel", marks=pytest.mark.openvino),
])
def test_a_checkpoint_the_backend_cannot_load_is_one_line(mismatched_llama, tmp_path, target, backend):
    out = tmp_path / "out"
    done = llmopt_subprocess(["export", "-m", str(mismatched_llama), "--target", target, "-o", str(out)])
    assert done.returncode == 1
    error = assert_one_line_error(done.stderr)
    assert error.startswith(f"error: export failed in {backend} for model_type 'llama': ")
    assert "size mismatch" in error or "shape" in error.lower(), error  # the backend's own words
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))

    debug = llmopt_subprocess(["export", "-m", str(mismatched_llama), "--target", target, "-o", str(out)],
                              env={"LLMOPT_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.onnx
def test_phi3_with_long_context_and_no_rope_scaling_is_one_line(tiny_llama, tmp_path):
    """The builder picks its LongRoPE class when the two context lengths differ and reads rope_scaling: KeyError."""
    model = tiny_architectures.build("phi3", tiny_llama, tmp_path / "phi3", max_position_embeddings=1024,
                                     original_max_position_embeddings=512)
    done = llmopt_subprocess(["export", "-m", str(model), "--target", "onnx", "-o", str(tmp_path / "out")])
    assert done.returncode == 1
    error = assert_one_line_error(done.stderr)
    assert error.startswith("error: export failed in the onnxruntime-genai model builder for model_type 'phi3': ")
