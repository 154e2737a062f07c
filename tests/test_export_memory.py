"""Export memory (issue 14): no PyTorch weights are alive when the parity check opens the artifact.

Peak memory of export plus validation stays near the weights only if the exporter's model (and the
backend's references to its tensors) and the parity check's reference model are both gone before
the artifact's runtime loads its own copy. Every model transformers loads during the export is
watched through weak references, and the check runs where the candidate runner is constructed;
the test itself never collects garbage, so weights left in reference cycles count as alive.
"""

from __future__ import annotations

import shutil
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


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_the_parity_reference_streams_its_layers_and_equals_the_whole_model(stored, untied_llama, tmp_path):
    """The reference never holds every decoder layer in fp32 (a 16-bit 7B checkpoint would need 28 GB):
    each layer is read from the safetensors file when it runs, and the logits are the whole model's."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt import validation
    from llmopt.runners import pytorch

    checkpoint = tmp_path / stored
    shutil.copytree(untied_llama, checkpoint, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    AutoModelForCausalLM.from_pretrained(untied_llama, dtype=getattr(torch, stored)).save_pretrained(checkpoint)

    device_map = pytorch.streamed_device_map(checkpoint)
    assert {name for name, place in device_map.items() if place == "disk"} == {"model.layers.0", "model.layers.1"}
    streamed = pytorch.PyTorchRunner(checkpoint, threads=1, streamed=True)
    resident = {name for name, parameter in streamed.model.named_parameters() if parameter.device.type != "meta"}
    assert resident and not any(name.startswith("model.layers.") for name in resident)
    assert all(parameter.dtype == torch.float32 for parameter in streamed.model.parameters())
    streamed.close()

    token_ids, reference = pytorch.reference_logits(checkpoint, 48)
    whole = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = whole(torch.tensor([token_ids])).logits[0].numpy()
    assert token_ids == validation.validation_ids(streamed.tokenizer, 48)
    np.testing.assert_allclose(reference, expected, rtol=0, atol=1e-5)


def test_a_checkpoint_without_safetensors_is_loaded_whole(untied_llama, tmp_path):
    from llmopt.runners import pytorch

    checkpoint = tmp_path / "pickled"
    shutil.copytree(untied_llama, checkpoint, ignore=shutil.ignore_patterns("*.safetensors"))
    assert pytorch.streamed_device_map(checkpoint) is None
    assert pytorch.streamed_device_map(untied_llama) is not None
