"""The route that outlives TensorRT-LLM's engine builder: static ONNX graphs -> onnxruntime's TensorRT EP.

``target: onnx``, ``shapes.static: true``, ``onnx.provider: tensorrt``. Without a GPU this checks the
plan (profiles pinned to the recipe's shapes, EPContext options), the recipe errors, the one-line
refusals, and, with the real onnxruntime of this machine, that a session which does not run on the
provider its artifact names is refused instead of silently running on the CPU. The build itself is
marked ``gpu`` / ``tensorrt`` and skips here with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmopt import api, artifact
from llmopt.cli.main import main
from llmopt.errors import ArtifactError, MissingDependencyError, RecipeError
from llmopt.exporters import tensorrt_ep
from llmopt.hardware import GIB, DetectedGpu, detect_gpus
from llmopt.recipe import resolve

H100 = DetectedGpu("NVIDIA H100 80GB HBM3", 90, 80 * GIB)
A100 = DetectedGpu("NVIDIA A100-SXM4-80GB", 80, 80 * GIB)


def trt_recipe(model="some/model", batch_size=2, sequence_length=64, **overrides):
    return resolve(None, {"model.id": str(model), "target": "onnx", "shapes.static": True, "onnx.provider": "tensorrt",
                          "shapes.batch_size": batch_size, "shapes.sequence_length": sequence_length, **overrides})


def test_plan_pins_every_profile_to_the_recipe_shapes_and_embeds_the_engine():
    plan = api.plan(trt_recipe(**{"precision.dtype": "fp16"}))["plan"]
    build = plan["tensorrt"]["build"]
    prefill = build["prefill"]
    assert prefill["trt_profile_min_shapes"] == "input_ids:2x64,position_ids:2x64,attention_mask:2x1x64x64"
    for graph in build.values():
        assert graph["trt_profile_min_shapes"] == graph["trt_profile_opt_shapes"] == graph["trt_profile_max_shapes"]
        assert graph["trt_dump_ep_context_model"] is True and graph["trt_ep_context_embed_mode"] == 1
        assert graph["trt_fp16_enable"] is True
        assert set(graph) <= tensorrt_ep.OPTIONS  # only documented option names reach onnxruntime
    assert "attention_mask:2x1x1x65" in build["decode"]["trt_profile_min_shapes"]
    assert build["decode"]["trt_ep_context_file_path"] == "<artifact>/decode_ctx.onnx"
    assert plan["runtime"]["graphs"] == {"prefill": "prefill_ctx.onnx", "decode": "decode_ctx.onnx"}
    assert plan["runtime"]["providers"] == [["TensorrtExecutionProvider", {"device_id": 0, "trt_fp16_enable": True}]]


def test_provider_options_pass_through_by_their_documented_names():
    plan = api.plan(trt_recipe(**{"onnx.provider_options": {"trt_builder_optimization_level": 5}}))["plan"]
    assert plan["tensorrt"]["build"]["prefill"]["trt_builder_optimization_level"] == 5
    assert plan["runtime"]["providers"][0][1]["trt_builder_optimization_level"] == 5


@pytest.mark.parametrize("overrides, words", [
    ({"onnx.provider_options": {"trt_fp16_enabled": True}}, "onnx.provider_options.trt_fp16_enabled': not a TensorRT"),
    ({"onnx.provider_options": {"trt_profile_min_shapes": "x:1"}}, "onnx.provider_options.trt_profile_min_shapes': set by shapes"),
    ({"precision.dtype": "bf16"}, "precision.dtype"),
])
def test_recipe_errors_name_the_field(overrides, words):
    with pytest.raises(RecipeError, match=words.replace(".", r"\.")):
        api.plan(trt_recipe(**overrides))


def test_provider_options_without_the_tensorrt_provider_are_refused():
    with pytest.raises(RecipeError, match="only read with onnx.provider tensorrt"):
        api.plan(trt_recipe(**{"onnx.provider": "cpu", "onnx.provider_options": {"device_id": 0}}))


def test_dynamic_onnx_with_tensorrt_points_at_the_static_route():
    with pytest.raises(RecipeError) as caught:
        api.plan(resolve(None, {"model.id": "some/model", "target": "onnx", "onnx.provider": "tensorrt"}))
    assert "shapes.static: true" in str(caught.value)


def test_export_without_the_provider_fails_in_one_line_before_any_work(capsys, tiny_llama, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" in ort.get_available_providers() and detect_gpus():
        pytest.skip("this machine can build TensorRT engines")
    code = main(["--quiet", "export", "-m", str(tiny_llama), "-t", "onnx", "--set", "shapes.static=true",
                 "--set", "onnx.provider=tensorrt", "--sequence-length", "32", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: ") and ("llmopt[gpu]" in err.splitlines()[0] or "NVIDIA GPU" in err.splitlines()[0])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def static_cpu_artifact(tiny_llama, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    output = tmp_path_factory.mktemp("static-cpu") / "artifact"
    api.export(resolve(None, {"model.id": str(tiny_llama), "target": "onnx", "shapes.static": True,
                              "shapes.sequence_length": 32}), output, validate=False)
    return output


def test_a_session_that_falls_back_to_the_cpu_is_refused(static_cpu_artifact, monkeypatch):
    """The real onnxruntime of this machine: asking for CUDA without it falls back to the CPU with only a
    warning; the runner reads the session's providers and refuses instead of running there."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    from llmopt.runners.static import OnnxStaticRunner

    manifest = artifact.read_manifest(static_cpu_artifact)
    manifest.runtime = {**manifest.runtime, "providers": ["CUDAExecutionProvider"]}
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [H100])  # past the GPU check: onnxruntime decides
    with pytest.raises(ArtifactError, match="needs onnxruntime's CUDAExecutionProvider, but the session runs on "
                                            "CPUExecutionProvider"):
        OnnxStaticRunner(static_cpu_artifact, manifest.batch_size, manifest.sequence_length, manifest=manifest)
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [])
    with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU; this machine has none"):
        OnnxStaticRunner(static_cpu_artifact, manifest.batch_size, manifest.sequence_length, manifest=manifest)


def test_engines_are_refused_on_another_gpu_before_onnxruntime_opens_them(static_cpu_artifact, monkeypatch):
    from llmopt.runners.static import OnnxStaticRunner

    manifest = artifact.read_manifest(static_cpu_artifact)
    manifest.runtime = {**manifest.runtime, "providers": [["TensorrtExecutionProvider", {"device_id": 0}]],
                        "gpu": {"name": H100.name, "sm": 90}, "versions": {"tensorrt": "10.13.3.9"}}
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [A100])
    with pytest.raises(ArtifactError, match=r"built for sm90 \(Hopper.*A100-SXM4-80GB \(sm80, Ampere\)"):
        OnnxStaticRunner(static_cpu_artifact, manifest.batch_size, manifest.sequence_length, manifest=manifest)
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [H100])
    monkeypatch.setattr("llmopt.gpu._installed", {"tensorrt": "10.9.0"}.get)
    with pytest.raises(ArtifactError, match=r"built with tensorrt 10\.13\.3\.9; this machine has 10\.9\.0"):
        OnnxStaticRunner(static_cpu_artifact, manifest.batch_size, manifest.sequence_length, manifest=manifest)


# ------------------------------------------------------------------------------ on an NVIDIA GPU


def _can_build() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "TensorrtExecutionProvider" in onnxruntime.get_available_providers() and bool(detect_gpus())


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _can_build(), reason="needs an NVIDIA GPU, onnxruntime-gpu and TensorRT (make install-gpu)")
def test_build_load_and_match_pytorch_on_the_gpu(tiny_llama, tmp_path):
    import onnx

    output = tmp_path / "trt"
    report = api.export(trt_recipe(tiny_llama, batch_size=1, sequence_length=32), output)
    assert report.manifest.validation["passed"]
    assert sorted(path.name for path in output.glob("*.onnx")) == ["decode_ctx.onnx", "prefill_ctx.onnx"]
    assert not (output / "weights.bin").exists()  # the engines hold the weights
    for name in ("prefill", "decode"):
        graph = onnx.load(str(output / f"{name}_ctx.onnx"), load_external_data=False).graph
        assert [node.op_type for node in graph.node] == ["EPContext"]
    runtime = json.loads((output / "llmopt.json").read_text())["runtime"]
    assert runtime["gpu"]["sm"] == detect_gpus()[0].sm and runtime["versions"]["tensorrt"]
    results = api.run(output, ["Hello there"], temperature=0.0, max_new_tokens=8, chat=False)
    assert 0 < len(results[0].token_ids) <= 8
