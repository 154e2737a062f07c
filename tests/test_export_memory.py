"""Export memory (issue 14): no PyTorch weights are alive when the parity check opens the artifact.

Peak memory of export plus validation stays near the weights only if the exporter's model (and the
backend's references to its tensors) and the parity check's reference model are both gone before
the artifact's runtime loads its own copy. Every model transformers loads during the export is
watched through weak references, and the check runs where the candidate runner is constructed;
the test itself never collects garbage, so weights left in reference cycles count as alive.
"""

from __future__ import annotations

import weakref

import pytest

from llmopt import api
from llmopt.recipe import resolve
from llmopt.registry import runner_class

TARGETS = [pytest.param("onnx", marks=pytest.mark.onnx), pytest.param("openvino", marks=pytest.mark.openvino)]


@pytest.mark.parametrize("target", TARGETS)
def test_no_pytorch_weights_alive_when_the_artifact_is_opened(target, tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime_genai" if target == "onnx" else "optimum.intel")
    import transformers

    loaded: list[tuple[str, weakref.ref]] = []
    original = transformers.PreTrainedModel.from_pretrained.__func__

    def watched(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        loaded.append((type(model).__name__, weakref.ref(model)))
        loaded.extend((name, weakref.ref(parameter)) for name, parameter in model.named_parameters())
        return model

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(watched))
    alive_at_open: list[list[str]] = []

    def checked_runner_class(name, static):
        runner = runner_class(name, static)

        class Checked(runner):
            def __init__(self, *args, **kwargs):
                alive_at_open.append([label for label, ref in loaded if ref() is not None])
                super().__init__(*args, **kwargs)

        return Checked

    monkeypatch.setattr(api, "runner_class", checked_runner_class)
    report = api.export(resolve(None, {"model.id": str(tiny_llama), "target": target}), tmp_path / "artifact")

    assert report.manifest.validation["passed"]
    models = [label for label, _ in loaded if "ForCausalLM" in label]
    assert len(models) == 2, models  # the exporter's model and the parity check's reference
    assert alive_at_open == [[]]  # one artifact opened, with no PyTorch model or weight alive
