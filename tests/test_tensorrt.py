"""The tensorrt target without a GPU: recipe -> TensorRT-LLM build arguments, errors, engine checks.

The builder is TensorRT-LLM's LLM API (pinned tensorrt-llm 1.2.1):
``LLM(model, dtype, tensor_parallel_size, build_config=BuildConfig(max_batch_size, max_input_len,
max_seq_len, max_num_tokens), quant_config=QuantConfig(quant_algo, kv_cache_quant_algo))``.
Tests marked ``tensorrt``/``gpu`` build and run an engine; they skip unless tensorrt_llm is installed
and an NVIDIA GPU is present (``make install-tensorrt``).
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from llmopt import api, artifact
from llmopt.artifact import Manifest
from llmopt.errors import ArtifactError, MissingDependencyError, RecipeError, UsageError
from llmopt.exporters import tensorrt as trt
from llmopt.hardware import GIB, GPUS, DetectedGpu, detect_gpus, gpu_spec
from llmopt.recipe import resolve
from tests._hardening import assert_one_error_line, dry_run, failing
from llmopt.runners import tensorrt as trt_runner

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
H100 = DetectedGpu("NVIDIA H100 80GB HBM3", 90, 80 * GIB)
A100 = DetectedGpu("NVIDIA A100-SXM4-80GB", 80, 80 * GIB)
T4 = DetectedGpu("Tesla T4", 75, 15 * GIB)

HAVE_TENSORRT = trt._module_available("tensorrt_llm") and bool(detect_gpus())
requires_tensorrt = pytest.mark.skipif(
    not HAVE_TENSORRT, reason="needs an NVIDIA GPU with TensorRT-LLM installed (make install-tensorrt)"
)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("LLMOPT_DEBUG", raising=False)





# ------------------------------------------------------------------------------ shipped recipes


EXPECTED_BUILD = {"max_batch_size": 1, "max_input_len": 2047, "max_seq_len": 2048, "max_num_tokens": 2047,
                  "max_beam_width": 1, "gather_context_logits": True}


def test_fp16_recipe_plan(capsys):
    code, result, err = dry_run(capsys, "--config", str(CONFIGS / "smollm2-tensorrt-fp16.yaml"))
    assert code == 0, err
    plan = result["plan"]
    assert plan["pinned"] == "tensorrt-llm==1.2.1"
    assert plan["build_config"] == EXPECTED_BUILD
    assert plan["quant_config"] is None and plan["calibration"] is None
    assert plan["llm"] == {"model": "<checkpoint>", "dtype": "float16", "tensor_parallel_size": 1,
                           "build_config": "BuildConfig(**build_config)"}
    assert plan["gpu"] == {"name": "H100", "sm": 90, "architecture": "Hopper", "memory_gib": 80, "bf16": True, "fp8": True}
    assert plan["memory_estimate"]["status"] == "ok" and plan["memory_estimate"]["fits"] is True


def test_fp8_recipe_plan(capsys):
    code, result, err = dry_run(capsys, "--config", str(CONFIGS / "smollm2-tensorrt-fp8.yaml"))
    assert code == 0, err
    plan = result["plan"]
    assert plan["build_config"] == EXPECTED_BUILD
    assert plan["quant_config"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    calibration = plan["calibration"]
    assert calibration["algo"] == "fp8" and calibration["modelopt_config"] == "FP8_DEFAULT_CFG"
    assert calibration["kv_cache_config"] == "FP8_KV_CFG" and calibration["num_samples"] == 64
    assert plan["llm"]["model"] == "<quantized checkpoint>" and "quant_config" not in plan["llm"]
    assert plan["memory_estimate"]["kv_cache_dtype"] == "fp8"


def test_w4a16_awq_recipe_plan(capsys):
    code, result, err = dry_run(capsys, "--config", str(CONFIGS / "smollm2-tensorrt-w4a16-awq.yaml"))
    assert code == 0, err
    plan = result["plan"]
    assert plan["quant_config"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None}
    assert plan["calibration"]["modelopt_config"] == "INT4_AWQ_CFG" and plan["calibration"]["group_size"] == 64
    assert plan["memory_estimate"]["weights_precision"].startswith("int4 (group 64)")


def test_dry_run_imports_no_nvidia_library():
    code = (
        "import sys\n"
        "from llmopt.cli.main import main\n"
        "for name in ('smollm2-tensorrt-fp16.yaml', 'smollm2-tensorrt-fp8.yaml', 'smollm2-tensorrt-w4a16-awq.yaml'):\n"
        "    assert main(['export', '--config', f'{sys.argv[1]}/{name}', '--dry-run', '--json']) == 0\n"
        "loaded = [m for m in sys.modules if m.startswith(('tensorrt', 'modelopt'))]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code, str(CONFIGS)], check=True, capture_output=True, text=True)


@pytest.mark.parametrize("overrides, expected", [
    ({"quantization.weight_format": "int8"}, {"quant_algo": "W8A8_SQ_PER_CHANNEL", "modelopt_algo": "w8a8_sq"}),
    ({"quantization.weight_format": "int8", "quantization.algorithm": "rtn"}, {"quant_algo": "W8A16", "modelopt_algo": None}),
    ({"quantization.weight_format": "int4", "quantization.algorithm": "rtn"}, {"quant_algo": "W4A16", "modelopt_algo": None}),
    ({"quantization.weight_format": "int4", "quantization.awq": True}, {"quant_algo": "W4A16_AWQ", "modelopt_algo": "w4a16_awq"}),
    ({"tensorrt.kv_cache_dtype": "fp8"}, {"quant_algo": None, "kv_cache_quant_algo": "FP8", "modelopt_algo": "none"}),
    ({"quantization.kv_cache": "fp8"}, {"quant_algo": None, "kv_cache_quant_algo": "FP8", "modelopt_algo": "none"}),
    ({}, {"quant_algo": None, "kv_cache_quant_algo": None, "modelopt_algo": None}),
])
def test_quantization_mapping(overrides, expected):
    recipe = resolve(CONFIGS / "smollm2-tensorrt-fp16.yaml", overrides)
    plan = trt.quantization_plan(recipe)
    assert {key: plan[key] for key in expected} == expected


def test_weight_only_goes_through_quant_config(capsys):
    code, result, err = dry_run(capsys, "--config", str(CONFIGS / "smollm2-tensorrt-fp16.yaml"),
                                "--set", "quantization.weight_format=int8", "--set", "quantization.algorithm=rtn")
    assert code == 0, err
    assert result["plan"]["llm"]["quant_config"] == "QuantConfig(**quant_config)"
    assert result["plan"]["quant_config"] == {"quant_algo": "W8A16", "kv_cache_quant_algo": None}


def test_builder_args_pass_through_and_defaults(capsys):
    code, result, err = dry_run(capsys, "--model", "models/SmolLM2-135M-Instruct", "--target", "tensorrt",
                                "--batch-size", "4", "--sequence-length", "1024",
                                "--set", "tensorrt.builder_args={strongly_typed: true}")
    assert code == 0, err
    build = result["plan"]["build_config"]
    assert build["max_batch_size"] == 4 and build["max_seq_len"] == 1024 and build["max_input_len"] == 1023
    assert build["max_num_tokens"] == 4 * 1023 and build["strongly_typed"] is True
    assert result["plan"]["gpu"] is None
    assert "checked against the GPU at build time" in result["plan"]["memory_estimate"]["notes"][0]


# ------------------------------------------------------------------------------ error paths


@pytest.mark.parametrize("gpu", ["T4", "V100"])
def test_bf16_on_a_gpu_without_it(capsys, gpu):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "smollm2-tensorrt-fp16.yaml"),
                        "--set", f"tensorrt.gpu={gpu}", "--dtype", "bf16", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "precision.dtype", "bf16", gpu, "sm80")


@pytest.mark.parametrize("gpu", ["A100", "A10G", "T4"])
def test_fp8_before_ada(capsys, gpu):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "smollm2-tensorrt-fp8.yaml"),
                        "--set", f"tensorrt.gpu={gpu}", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "fp8", gpu, "sm89")


def test_fp8_kv_cache_before_ada(capsys):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "smollm2-tensorrt-fp16.yaml"),
                        "--set", "tensorrt.gpu=A100", "--set", "tensorrt.kv_cache_dtype=fp8", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "tensorrt.kv_cache_dtype", "sm89")


@pytest.mark.parametrize("gpu", ["L4", "L40S", "H100", "H200"])
def test_fp8_on_ada_and_hopper(capsys, gpu):
    code, _, err = dry_run(capsys, "--config", str(CONFIGS / "smollm2-tensorrt-fp8.yaml"), "--set", f"tensorrt.gpu={gpu}")
    assert code == 0, err


def test_unknown_gpu_lists_the_accepted_names(capsys):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "smollm2-tensorrt-fp16.yaml"),
                        "--set", "tensorrt.gpu=Voodoo5", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "Voodoo5", "T4", "A100", "L4", "H100")


@pytest.mark.parametrize("setting, needle", [
    ("tensorrt.kv_cache_dtype=int8", "int8 KV cache"),
    ("quantization.algorithm=gptq", "quantization.algorithm"),
    ("quantization.group_size=128", "576"),
    ("quantization.group_size=32", "quantization.group_size"),
    ("tensorrt.tensor_parallel_size=2", "9 attention heads"),
    ("tensorrt.builder_args={max_batch_size: 8}", "shapes.batch_size"),
    ("tensorrt.max_input_len=2048", "tensorrt.max_input_len"),
])
def test_recipe_errors(capsys, setting, needle):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "smollm2-tensorrt-w4a16-awq.yaml"), "--set", setting, "--dry-run")
    assert code == 2
    assert_one_error_line(err, needle)


def test_max_tokens_is_clamped_to_the_engine_length():
    """TensorRT-LLM rejects prompt + max_tokens > max_seq_len; the runner stops at the artifact's length instead."""
    from llmopt.runners.base import SamplingConfig

    options = trt_runner.sampling_options(SamplingConfig(max_new_tokens=128), prompt_length=2000, max_seq_len=2048,
                                          end_id=2, pad_id=2)
    assert options["max_tokens"] == 48 and options["top_k"] == 1  # greedy
    options = trt_runner.sampling_options(SamplingConfig(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=5),
                                          prompt_length=10, max_seq_len=2048, end_id=2, pad_id=0)
    assert options["max_tokens"] == 16
    assert (options["temperature"], options["top_p"], options["seed"]) == (0.7, 0.9, 5)


def test_a_prompt_longer_than_the_engine_takes_is_refused():
    from llmopt.errors import PromptTooLongError
    from llmopt.runners.base import SamplingConfig

    runner = object.__new__(trt_runner.TensorRTRunner)
    runner.max_input_len, runner.max_seq_len, runner.end_id, runner.pad_id = 100, 128, 2, 2
    runner.SamplingParams = dict
    assert runner._params(SamplingConfig(max_new_tokens=64), list(range(100)))["max_tokens"] == 28
    with pytest.raises(PromptTooLongError, match="101 tokens but the engine accepts at most 100"):
        runner._params(SamplingConfig(), list(range(101)))


def test_modelopt_loads_with_the_dtype_keyword_of_the_installed_transformers(monkeypatch):
    """transformers < 4.56 (TensorRT-LLM's older pins) passes dtype= on to the model constructor, which rejects it."""
    from llmopt import _deps

    monkeypatch.setattr(_deps, "version_of", {"transformers": "4.51.3"}.get)
    assert _deps.dtype_keyword() == "torch_dtype"
    monkeypatch.setattr(_deps, "version_of", {"transformers": "4.57.6"}.get)
    assert _deps.dtype_keyword() == "dtype"


def test_fp8_kv_cache_with_weight_only_is_refused():
    recipe = resolve(CONFIGS / "smollm2-tensorrt-fp16.yaml", {"quantization.weight_format": "int4",
                                                                "quantization.algorithm": "rtn",
                                                                "tensorrt.kv_cache_dtype": "fp8"})
    with pytest.raises(RecipeError, match="weight-only W4A16"):
        trt.quantization_plan(recipe)


def test_a_model_that_cannot_fit_names_both_numbers(capsys):
    code, err = failing(capsys, "export", "--model", "meta-llama/Llama-2-13b-hf", "--target", "tensorrt",
                        "--dtype", "fp16", "--set", "tensorrt.gpu=L4", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "does not fit", "weights 26.03 GB", "L4", "GB usable")
    # int4 AWQ makes it fit on the same card.
    code, result, err = dry_run(capsys, "--model", "meta-llama/Llama-2-13b-hf", "--target", "tensorrt", "--dtype", "fp16",
                                "--set", "tensorrt.gpu=L4", "--set", "quantization.weight_format=int4")
    assert code == 0, err
    assert result["plan"]["memory_estimate"]["fits"] is True


def test_without_the_sdk_export_fails_in_one_line_before_any_work(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(trt, "_module_available", lambda name: False)
    monkeypatch.setattr(trt, "detect_gpus", lambda: [])
    monkeypatch.setattr("llmopt.sources.resolve_model", lambda *a, **k: pytest.fail("resolved the model before preflight"))
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "smollm2-tensorrt-fp8.yaml"), "-o", str(tmp_path / "out"))
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert_one_error_line(err, "tensorrt_llm", "nvidia-modelopt", "NVIDIA GPU", "make install-tensorrt")
    assert not (tmp_path / "out").exists()


def test_preflight_refuses_a_gpu_other_than_the_recipes(monkeypatch):
    monkeypatch.setattr(trt, "_module_available", lambda name: True)
    monkeypatch.setattr(trt, "detect_gpus", lambda: [A100])
    with pytest.raises(UsageError, match=r"H100 \(sm90, Hopper\).*A100-SXM4-80GB \(sm80, Ampere\)"):
        trt.TensorRTExporter().preflight(resolve(CONFIGS / "smollm2-tensorrt-fp16.yaml"))
    monkeypatch.setattr(trt, "detect_gpus", lambda: [H100])
    trt.TensorRTExporter().preflight(resolve(CONFIGS / "smollm2-tensorrt-fp8.yaml"))


def test_preflight_checks_the_gpu_it_finds_when_the_recipe_names_none(monkeypatch):
    monkeypatch.setattr(trt, "_module_available", lambda name: True)
    monkeypatch.setattr(trt, "detect_gpus", lambda: [T4])
    recipe = resolve(overrides={"model.id": "models/SmolLM2-135M-Instruct", "target": "tensorrt", "precision.dtype": "bf16"})
    with pytest.raises(RecipeError, match="bf16 needs an Ampere"):
        trt.TensorRTExporter().preflight(recipe)


def test_gpu_names():
    assert gpu_spec("NVIDIA H100 80GB HBM3").sm == 90
    assert gpu_spec("NVIDIA A100-SXM4-40GB").memory_bytes == 40 * GIB
    assert gpu_spec("a100-80gb").memory_bytes == 80 * GIB
    assert gpu_spec("Tesla T4").sm == 75 and not gpu_spec("T4").bf16
    assert (GPUS["V100"].sm, GPUS["A10"].sm, GPUS["A100"].sm, GPUS["L4"].sm, GPUS["L40S"].sm, GPUS["H200"].sm) == (70, 86, 80, 89, 89, 90)
    assert [name for name, gpu in GPUS.items() if gpu.fp8][:3] == ["L4", "L40", "L40S"]


# ------------------------------------------------------------------------------ the engine's compatibility


def make_engine_artifact(root: Path, sm: int = 90, versions: dict | None = None) -> Path:
    output = root / "engine-artifact"
    with artifact.staging(output) as workdir:
        (workdir / "engine").mkdir()
        (workdir / "engine" / "rank0.engine").write_bytes(b"not really an engine")
        (workdir / "engine" / "config.json").write_text("{}")
        artifact.finalize(workdir, Manifest(
            target="tensorrt", recipe={}, source={}, backend_versions={"tensorrt_llm": "1.2.1"},
            shapes={"batch_size": 1, "sequence_length": 2048}, precision="fp16", quantization={},
            runtime={"loader": "tensorrt_llm.LLM", "engine_dir": "engine",
                     "gpu": {"name": "NVIDIA H100 80GB HBM3", "sm": sm, "architecture": "Hopper"},
                     "versions": versions or {"tensorrt_llm": "1.2.1", "tensorrt": "10.10.0.31"}},
        ))
    return output


def test_runner_refuses_another_architecture_before_importing_tensorrt_llm(tmp_path, monkeypatch):
    path = make_engine_artifact(tmp_path, sm=90)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # importing it now would fail: the check must come first
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [A100])
    with pytest.raises(ArtifactError) as caught:
        api.open_runner(path)
    message = str(caught.value)
    assert "built for sm90 (Hopper" in message and "A100-SXM4-80GB (sm80, Ampere)" in message
    assert "re-export" in message


def test_runner_refuses_another_version(tmp_path, monkeypatch):
    path = make_engine_artifact(tmp_path, sm=90)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [H100])
    monkeypatch.setattr("llmopt.gpu._installed", {"tensorrt_llm": "1.2.0", "tensorrt": "10.10.0.31"}.get)
    with pytest.raises(ArtifactError, match=r"built with tensorrt_llm 1\.2\.1; this machine has 1\.2\.0"):
        api.open_runner(path)
    monkeypatch.setattr("llmopt.gpu._installed", {"tensorrt_llm": "1.2.1", "tensorrt": "10.9.0"}.get)
    with pytest.raises(ArtifactError, match=r"tensorrt 10\.10\.0\.31; this machine has 10\.9\.0"):
        api.open_runner(path)
    monkeypatch.setattr("llmopt.gpu._installed", {"tensorrt_llm": None, "tensorrt": None}.get)
    with pytest.raises(MissingDependencyError, match="needs tensorrt_llm 1.2.1, which is not installed"):
        api.open_runner(path)


def test_runner_without_a_gpu_is_its_own_error(tmp_path, monkeypatch, capsys):
    path = make_engine_artifact(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    monkeypatch.setattr("llmopt.gpu.detect_gpus", lambda: [])
    with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU; this machine has none"):
        api.open_runner(path)
    code, err = failing(capsys, "--quiet", "run", str(path), "hello")
    assert code == 1
    assert_one_error_line(err, "needs an NVIDIA GPU")


def test_check_engine_compatible_accepts_a_match(tmp_path):
    path = make_engine_artifact(tmp_path)
    manifest = artifact.read_manifest(path)
    trt_runner.check_engine_compatible(path, manifest, gpus=[H100],
                                       installed={"tensorrt_llm": "1.2.1", "tensorrt": "10.10.0.31"})


# ------------------------------------------------------------------------------ the build call, with stand-ins


def fake_tensorrt_llm(monkeypatch, calls: list):
    package = types.ModuleType("tensorrt_llm")
    llmapi = types.ModuleType("tensorrt_llm.llmapi")

    class BuildConfig:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class QuantAlgo:
        FP8 = "QuantAlgo.FP8"
        W8A16 = "QuantAlgo.W8A16"
        W4A16_AWQ = "QuantAlgo.W4A16_AWQ"

    class QuantConfig:
        def __init__(self, quant_algo=None, kv_cache_quant_algo=None):
            self.quant_algo, self.kv_cache_quant_algo = quant_algo, kv_cache_quant_algo

    class LLM:
        def __init__(self, **kwargs):
            calls.append(("LLM", kwargs))

        def save(self, engine_dir):
            Path(engine_dir).mkdir(parents=True)
            (Path(engine_dir) / "rank0.engine").write_bytes(b"engine")
            calls.append(("save", engine_dir))

        def shutdown(self):
            calls.append(("shutdown",))

    engine_backend = types.ModuleType("tensorrt_llm._tensorrt_engine")
    llmapi.BuildConfig, llmapi.QuantAlgo, llmapi.QuantConfig = BuildConfig, QuantAlgo, QuantConfig
    engine_backend.LLM = LLM
    package.llmapi, package._tensorrt_engine = llmapi, engine_backend
    monkeypatch.setitem(sys.modules, "tensorrt_llm", package)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", engine_backend)


def test_export_builds_and_records_the_gpu_and_versions(tiny_llama, tmp_path, monkeypatch):
    calls: list = []
    fake_tensorrt_llm(monkeypatch, calls)
    monkeypatch.setattr(trt, "detect_gpus", lambda: [H100])
    monkeypatch.setattr(trt, "engine_versions", lambda: {"tensorrt_llm": "1.2.1", "tensorrt": "10.10.0.31"})
    recipe = resolve(CONFIGS / "smollm2-tensorrt-fp16.yaml",
                     {"model.id": str(tiny_llama), "quantization.weight_format": "int8", "quantization.algorithm": "rtn"})
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = trt.TensorRTExporter().export(recipe, tiny_llama, workdir)
    (_, kwargs), save, shutdown = calls
    assert kwargs["model"] == str(tiny_llama) and kwargs["dtype"] == "float16" and kwargs["tensor_parallel_size"] == 1
    assert kwargs["build_config"].kwargs == EXPECTED_BUILD
    assert kwargs["quant_config"].quant_algo == "QuantAlgo.W8A16" and kwargs["quant_config"].kv_cache_quant_algo is None
    assert save == ("save", str(workdir / "engine")) and shutdown == ("shutdown",)
    assert (workdir / "engine" / "rank0.engine").is_file()
    runtime = result.runtime
    assert runtime["gpu"] == {"name": H100.name, "sm": 90, "architecture": "Hopper", "memory_bytes": 80 * GIB}
    assert runtime["versions"] == {"tensorrt_llm": "1.2.1", "tensorrt": "10.10.0.31"}
    assert runtime["engine_dir"] == "engine" and runtime["quant_config"]["quant_algo"] == "W8A16"


def test_export_calibrates_with_modelopt_before_the_build(tiny_llama, tmp_path, monkeypatch):
    calls: list = []
    fake_tensorrt_llm(monkeypatch, calls)
    monkeypatch.setattr(trt, "detect_gpus", lambda: [H100])
    seen = {}

    def fake_quantize(checkpoint, out_dir, algo, texts, **options):
        from llmopt.modelopt_ckpt import QuantizeReport

        Path(out_dir).mkdir(parents=True)
        seen.update(algo=algo, texts=len(texts), **options)
        return QuantizeReport(str(out_dir), algo, "FP8", "FP8", None, len(texts), "cpu", "fp16", "test")

    monkeypatch.setattr("llmopt.modelopt_ckpt.quantize_checkpoint", fake_quantize)
    recipe = resolve(CONFIGS / "smollm2-tensorrt-fp8.yaml", {"model.id": str(tiny_llama), "quantization.num_samples": 8})
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = trt.TensorRTExporter().export(recipe, tiny_llama, workdir)
    assert seen["algo"] == "fp8" and seen["kv_cache"] == "fp8" and seen["texts"] == 8
    (_, kwargs), _, _ = calls
    assert kwargs["model"].endswith("quantized") and "quant_config" not in kwargs  # read from hf_quant_config.json
    assert result.runtime["calibration"]["quant_algo"] == "FP8"
    assert not any(path.name.startswith(".llmopt-quantized-") for path in tmp_path.iterdir())  # scratch removed


# ------------------------------------------------------------------------------ on an NVIDIA GPU


@pytest.mark.tensorrt
@pytest.mark.gpu
@requires_tensorrt
@pytest.mark.parametrize("config", ["smollm2-tensorrt-fp16.yaml", "smollm2-tensorrt-fp8.yaml", "smollm2-tensorrt-w4a16-awq.yaml"])
def test_build_run_and_validate_on_the_gpu(tmp_path, config):
    """Build on this GPU with the export's parity gate on, then check logits and a greedy run."""
    smollm2 = ROOT / "models" / "SmolLM2-135M-Instruct"
    if not (smollm2 / "config.json").is_file():
        pytest.skip("the SmolLM2 checkpoint is missing: run `make model`")
    gpu = detect_gpus()[0]
    recipe = resolve(CONFIGS / config, {"tensorrt.gpu": gpu.name, "shapes.sequence_length": 512,
                                        "tensorrt.gather_context_logits": True})
    report = api.export(recipe, tmp_path / "engine", validate=True)  # fails the export below the recipe's thresholds
    validation_report = report.manifest.validation
    assert validation_report["passed"] and validation_report["top1_agreement"] >= recipe.validation.min_top1_agreement
    assert report.manifest.runtime["gpu"]["sm"] == gpu.sm
    runner = api.open_runner(tmp_path / "engine")
    try:
        from llmopt import validation

        ids = validation.validation_ids(runner.tokenizer, 128)
        logits = runner.logits(ids)
        assert logits.shape[0] == len(ids) and logits.shape[1] >= len(runner.tokenizer)
        assert np.isfinite(logits).all()
    finally:
        runner.close()
    results = api.run(tmp_path / "engine", ["What is the capital of France?"], max_new_tokens=16, temperature=0.0)
    assert 0 < len(results[0].token_ids) <= 16


# ------------------------------------------------------------------------------ the TensorRT environment's pins


def _pins_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_tensorrt_pins", ROOT / "scripts" / "check_tensorrt_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensorrt_extra_repeats_the_releases_pins():
    """pyproject's tensorrt extra and make install-tensorrt agree with TensorRT-LLM 1.2.1's published metadata."""
    pins = _pins_script()
    assert pins.consistency_errors() == []
    assert trt.TENSORRT_LLM_PIN == pins.RELEASE
    release = {requirement.name: str(requirement.specifier) for requirement in pins.release_requirements()}
    assert release["transformers"] == "==4.57.3" and release["nvidia-modelopt"] == "~=0.37.0"
    names = {requirement.name for requirement in pins.llmopt_requirements()}
    assert "tensorrt-llm" not in names and {"transformers", "nvidia-modelopt", "torch"} <= names


def test_tensorrt_environment_resolves_with_pip():
    """pip's resolver, against the package registry, for the release's Python 3.12 wheels (the Makefile's)."""
    pins = _pins_script()
    assert pins.main(["--python", "3.12"]) == 0


def test_detect_gpus_reads_nvidia_smi(tmp_path, monkeypatch):
    """The one nvidia-smi probe (llmopt.hardware.query_nvidia_smi) that detect_gpus and doctor share."""
    import os
    import stat

    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 9.0, 81559 MiB'\necho 'Tesla T4, 7.5, 15360 MiB'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpus() == [DetectedGpu("NVIDIA H100 80GB HBM3", 90, 81559 * 2**20), DetectedGpu("Tesla T4", 75, 15360 * 2**20)]
    script.write_text("#!/bin/sh\nexit 9\n")
    assert detect_gpus() == []
