"""NVIDIA GPUs: a TensorRT engine built by TensorRT-LLM's engine builder, TensorRT-LLM 1.2.1.

Why TensorRT-LLM's builder and not ONNX -> TensorRT: a decoder needs a KV cache, fused attention
and (for fp8, int4-AWQ and int8-SmoothQuant) quantized matmuls with calibrated scales. Through ONNX,
TensorRT sees a generic graph: the KV cache becomes graph inputs and outputs copied every step,
attention is unfused, there is no paged KV cache or in-flight batching, quantization means inserting
Q/DQ nodes by hand, and the decode loop is ours (that route exists as the onnx target with
``shapes.static: true`` and ``onnx.provider: tensorrt``, see ``llmopt.exporters.tensorrt_ep``).
TensorRT-LLM builds the engine with its GPT attention plugin, a paged KV cache, ModelOpt-calibrated
fp8/int4/int8 kernels and a C++ runtime with its own sampling, through a small Python API::

    build_config = BuildConfig(max_batch_size=..., max_input_len=..., max_seq_len=..., max_num_tokens=...)
    llm = tensorrt_llm._tensorrt_engine.LLM(model=checkpoint, dtype="float16", tensor_parallel_size=1,
                                            build_config=build_config)
    llm.save(engine_dir)

Why 1.2.1: from 1.0 on TensorRT-LLM's default ``LLM`` is its PyTorch backend and the engine builder
lives on as ``tensorrt_llm._tensorrt_engine.LLM`` (and ``trtllm-build``); it was deprecated in
February 2026 and removed from TensorRT-LLM's main branch in July 2026, so 1.2.x is the last line
that has it and 1.2.1 its newest release. Its wheels (Python 3.10 and 3.12) are on NVIDIA's index
only; it pins transformers 4.57.3 and ModelOpt ~=0.37.0, which ``scripts/check_tensorrt_pins.py``
resolves with llmopt's own set. An engine is tied to the TensorRT / TensorRT-LLM versions and to
the GPU architecture (SM) that built it, so the manifest records all three and the runner refuses a
mismatch before importing tensorrt_llm. Every TensorRT-LLM class, method and keyword used here is
checked against the release's API surface in tests/test_vendor_conformance.py.

Quantization: fp8, int4 (AWQ) and int8 (SmoothQuant) weights, and an fp8 KV cache, are calibrated
with ModelOpt by ``llmopt.modelopt_ckpt.quantize_checkpoint`` on llmopt's own calibration text (no
dataset download), then built from that pre-quantized checkpoint (TensorRT-LLM reads
``hf_quant_config.json``). Weight-only int8/int4 (``quantization.algorithm: rtn``) need no
calibration and go straight to ``LLM(quant_config=QuantConfig(quant_algo=W8A16 | W4A16))``.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from llmopt import events, memory
from llmopt._deps import install_hint, version_of
from llmopt.errors import MissingDependencyError, RecipeError, UsageError
from llmopt.exporters.base import Exporter, ExportResult
from llmopt.gpu import gpu_record, installed_tensorrt_version
from llmopt.hardware import DetectedGpu, GpuSpec, detect_gpus, gpu_spec, sm_architecture
from llmopt.recipe import Recipe

TENSORRT_LLM_PIN = "1.2.1"
ENGINE_DIR = "engine"
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# BuildConfig arguments that come from recipe fields: refused in builder_args.
_RESERVED_BUILDER_ARGS = {
    "max_batch_size": "shapes.batch_size", "max_seq_len": "shapes.sequence_length",
    "max_input_len": "tensorrt.max_input_len", "max_num_tokens": "tensorrt.max_num_tokens",
    "gather_context_logits": "tensorrt.gather_context_logits",
}
MODELOPT_CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "w4a16_awq": "INT4_AWQ_CFG", "w8a8_sq": "INT8_SMOOTHQUANT_CFG"}


def kv_cache_dtype(recipe: Recipe) -> str:
    """tensorrt.kv_cache_dtype, else quantization.kv_cache, else the compute dtype."""
    value = recipe.tensorrt.kv_cache_dtype
    if value == "auto" and recipe.quantization.kv_cache not in ("auto", "fp32"):
        value = {"u8": "int8"}.get(recipe.quantization.kv_cache, recipe.quantization.kv_cache)
    return recipe.precision.dtype if value == "auto" else value


def quantization_plan(recipe: Recipe) -> dict[str, Any]:
    """QuantConfig fields and how they are produced: modelopt calibration, TensorRT-LLM, or none."""
    quantization = recipe.quantization
    weight_format, algorithm = quantization.weight_format, quantization.algorithm
    kv = kv_cache_dtype(recipe)
    kv_algo = {"fp8": "FP8", "int8": "INT8"}.get(kv)
    if kv == "int8":
        raise RecipeError(
            "recipe field 'tensorrt.kv_cache_dtype': an int8 KV cache needs calibrated scales that ModelOpt's "
            "checkpoint export cannot write (it writes fp8 only); use fp8 (Ada/Hopper) or auto"
        )
    if weight_format == "none":
        quant_algo, modelopt_algo = None, ("none" if kv_algo else None)
    elif weight_format == "fp8":
        quant_algo, modelopt_algo = "FP8", "fp8"
    elif weight_format == "int4":
        if algorithm == "rtn" and not quantization.awq:
            quant_algo, modelopt_algo = "W4A16", None
        elif algorithm in ("auto", "awq") or quantization.awq:
            quant_algo, modelopt_algo = "W4A16_AWQ", "w4a16_awq"
        else:
            raise RecipeError(
                f"recipe field 'quantization.algorithm': {algorithm} is not available for int4 on the tensorrt target; "
                "accepted: auto or awq (W4A16_AWQ, calibrated), rtn (W4A16 weight-only)"
            )
    elif weight_format == "int8":
        if algorithm == "rtn":
            quant_algo, modelopt_algo = "W8A16", None
        elif algorithm == "auto":
            quant_algo, modelopt_algo = "W8A8_SQ_PER_CHANNEL", "w8a8_sq"
        else:
            raise RecipeError(
                f"recipe field 'quantization.algorithm': {algorithm} is not available for int8 on the tensorrt target; "
                "accepted: auto (W8A8 SmoothQuant, calibrated) or rtn (W8A16 weight-only)"
            )
    else:  # pragma: no cover - the recipe's Literal forbids anything else
        raise RecipeError(f"recipe field 'quantization.weight_format': unknown value {weight_format}")
    if kv_algo and modelopt_algo is None and quant_algo is not None:
        raise RecipeError(
            f"recipe field 'tensorrt.kv_cache_dtype': an fp8 KV cache is calibrated with ModelOpt, which the weight-only "
            f"{quant_algo} path skips; use quantization.algorithm auto/awq, or leave the KV cache auto"
        )
    return {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_algo, "kv_cache_dtype": kv, "modelopt_algo": modelopt_algo}


def resolved_gpu(recipe: Recipe) -> GpuSpec | None:
    return gpu_spec(recipe.tensorrt.gpu) if recipe.tensorrt.gpu else None


def build_config_args(recipe: Recipe) -> dict[str, Any]:
    options = recipe.tensorrt
    sequence_length = recipe.shapes.sequence_length
    max_input_len = options.max_input_len or sequence_length - 1
    for key in options.builder_args:
        if key in _RESERVED_BUILDER_ARGS:
            raise RecipeError(f"recipe field 'tensorrt.builder_args.{key}': set it with '{_RESERVED_BUILDER_ARGS[key]}' instead")
    if max_input_len >= sequence_length:
        raise RecipeError(
            f"recipe field 'tensorrt.max_input_len': {max_input_len} leaves no room to generate within "
            f"shapes.sequence_length {sequence_length}; use at most {sequence_length - 1}"
        )
    return {
        "max_batch_size": recipe.shapes.batch_size,
        "max_input_len": max_input_len,
        "max_seq_len": sequence_length,
        "max_num_tokens": options.max_num_tokens or recipe.shapes.batch_size * max_input_len,
        "max_beam_width": 1,
        "gather_context_logits": options.gather_context_logits,
        **options.builder_args,
    }


class TensorRTExporter(Exporter):
    target = "tensorrt"
    extra = "tensorrt"
    backend_distributions = ("tensorrt_llm", "tensorrt", "nvidia-modelopt", "transformers", "torch")
    backend = "TensorRT-LLM"

    def validates_here(self, recipe: Recipe) -> bool:
        # The build host has the GPU the engine runs on; teacher forcing needs the engine's prompt logits.
        return recipe.tensorrt.gather_context_logits

    # ----------------------------------------------------------------------------- pure checks

    def check(self, recipe: Recipe) -> None:
        quant = quantization_plan(recipe)
        build_config_args(recipe)
        gpu = resolved_gpu(recipe)
        if gpu is not None:
            self._check_gpu_supports(recipe, quant, gpu.name, gpu.sm, "recipe field 'tensorrt.gpu'")
        dims = memory.model_dims_for(recipe.model.id, recipe.model.revision)
        if quant["modelopt_algo"] == "w4a16_awq" and dims is not None:
            from llmopt.modelopt_ckpt import pick_block_size

            pick_block_size(dims.matmul_in_features(), recipe.quantization.group_size)
        if dims is not None and recipe.tensorrt.tensor_parallel_size > 1 and dims.num_heads % recipe.tensorrt.tensor_parallel_size:
            raise RecipeError(
                f"recipe field 'tensorrt.tensor_parallel_size': {recipe.tensorrt.tensor_parallel_size} does not divide "
                f"the model's {dims.num_heads} attention heads"
            )
        self.memory_estimate(recipe).check_fits(
            hint="raise tensorrt.tensor_parallel_size, quantize (int4/fp8), or lower the batch size or sequence length"
        )

    @staticmethod
    def _check_gpu_supports(recipe: Recipe, quant: dict[str, Any], name: str, sm: int, where: str) -> None:
        arch = f"{name} is sm{sm} ({sm_architecture(sm)})"
        if recipe.precision.dtype == "bf16" and sm < 80:
            raise RecipeError(
                f"recipe field 'precision.dtype': bf16 needs an Ampere (sm80) or newer GPU; {arch}; use fp16",
                hint=f"set by {where}",
            )
        if quant["quant_algo"] == "FP8" and sm < 89:
            raise RecipeError(
                f"recipe field 'quantization.weight_format': fp8 needs an Ada (sm89) or Hopper (sm90) GPU; {arch}; "
                "use int8 or int4",
                hint=f"set by {where}",
            )
        if quant["kv_cache_quant_algo"] == "FP8" and sm < 89:
            raise RecipeError(
                f"recipe field 'tensorrt.kv_cache_dtype': an fp8 KV cache needs an Ada (sm89) or Hopper (sm90) GPU; "
                f"{arch}; use auto",
                hint=f"set by {where}",
            )

    def memory_estimate(self, recipe: Recipe) -> memory.MemoryEstimate:
        quant = quantization_plan(recipe)
        estimate = memory.estimate_for_recipe(recipe, kv_cache_dtype=quant["kv_cache_dtype"])
        gpu = resolved_gpu(recipe)
        if gpu is not None:
            tp = recipe.tensorrt.tensor_parallel_size
            label = f"{tp} x {gpu.name}" if tp > 1 else gpu.name
            estimate.with_device(f"{label} ({gpu.memory_bytes / 2**30:g} GiB each)", gpu.memory_bytes * tp)
        else:
            estimate.notes.append("no tensorrt.gpu in the recipe: the fit is checked against the GPU at build time")
        return estimate

    def plan(self, recipe: Recipe) -> dict[str, Any]:
        quant = quantization_plan(recipe)
        build_config = build_config_args(recipe)
        gpu = resolved_gpu(recipe)
        dtype = TORCH_DTYPES[recipe.precision.dtype]
        quant_config = None
        if quant["quant_algo"] or quant["kv_cache_quant_algo"]:
            quant_config = {"quant_algo": quant["quant_algo"], "kv_cache_quant_algo": quant["kv_cache_quant_algo"]}
        calibration = None
        if quant["modelopt_algo"]:
            calibration = {
                "tool": "nvidia-modelopt",
                "call": "llmopt.modelopt_ckpt.quantize_checkpoint",
                "algo": quant["modelopt_algo"],
                "modelopt_config": MODELOPT_CONFIGS.get(quant["modelopt_algo"]),
                "kv_cache_config": "FP8_KV_CFG" if quant["kv_cache_quant_algo"] == "FP8" else None,
                "group_size": recipe.quantization.group_size if quant["modelopt_algo"] == "w4a16_awq" else None,
                "dataset": recipe.quantization.dataset or "llmopt validation text",
                "num_samples": recipe.quantization.num_samples,
                "max_length": min(recipe.shapes.sequence_length, 512),
                "device": recipe.tensorrt.calibration_device,
                "export": "modelopt.torch.export.export_hf_checkpoint (hf_quant_config.json carries quant_config)",
            }
        llm_kwargs: dict[str, Any] = {
            "model": "<quantized checkpoint>" if calibration else "<checkpoint>",
            "dtype": dtype,
            "tensor_parallel_size": recipe.tensorrt.tensor_parallel_size,
            "build_config": "BuildConfig(**build_config)",
        }
        if quant_config and not calibration:
            llm_kwargs["quant_config"] = "QuantConfig(**quant_config)"
        return {
            "backend": "tensorrt_llm",
            "pinned": f"tensorrt-llm=={TENSORRT_LLM_PIN}",
            "calls": [
                *(["quantize_checkpoint(checkpoint, <tmp>, **calibration)"] if calibration else []),
                "llm = tensorrt_llm._tensorrt_engine.LLM(**llm)",
                f"llm.save(<artifact>/{ENGINE_DIR})",
            ],
            "build_config": build_config,
            "quant_config": quant_config,
            "calibration": calibration,
            "llm": llm_kwargs,
            "gpu": None if gpu is None else {
                "name": gpu.name, "sm": gpu.sm, "architecture": gpu.architecture,
                "memory_gib": gpu.memory_bytes // 2**30, "bf16": gpu.bf16, "fp8": gpu.fp8,
            },
            "memory_estimate": self.memory_estimate(recipe).to_dict(),
        }

    # ----------------------------------------------------------------------------- machine

    def preflight(self, recipe: Recipe) -> None:
        missing = []
        if not _module_available("tensorrt_llm"):
            missing.append(f"tensorrt_llm (tensorrt-llm=={TENSORRT_LLM_PIN})")
        if quantization_plan(recipe)["modelopt_algo"] and not _module_available("modelopt"):
            missing.append("nvidia-modelopt (for calibration)")
        gpus = detect_gpus()
        if not gpus:
            missing.append("an NVIDIA GPU (nvidia-smi finds none)")
        if missing:
            names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
            raise MissingDependencyError(
                f"the 'tensorrt' target needs {names}, not found on this machine; install with: {install_hint('tensorrt')}"
            )
        self.check_build_gpu(recipe, gpus)

    def check_build_gpu(self, recipe: Recipe, gpus: list[DetectedGpu]) -> DetectedGpu:
        """The engine is built for the GPU it is built on: it must be the recipe's, and able to do its precision."""
        current = gpus[0]
        wanted = resolved_gpu(recipe)
        if wanted is not None and wanted.sm != current.sm:
            raise UsageError(
                f"recipe field 'tensorrt.gpu' is {wanted.name} (sm{wanted.sm}, {wanted.architecture}) but this machine's "
                f"GPU is {current.name} (sm{current.sm}, {current.architecture}); a TensorRT engine runs only on the "
                "architecture it was built on",
                hint=f"build on a {wanted.name}, or set tensorrt.gpu to this GPU",
            )
        self._check_gpu_supports(recipe, quantization_plan(recipe), current.name, current.sm, "this machine's GPU")
        tp = recipe.tensorrt.tensor_parallel_size
        if tp > len(gpus):
            raise UsageError(f"recipe field 'tensorrt.tensor_parallel_size': {tp} GPUs requested, this machine has {len(gpus)}")
        estimate = memory.estimate_for_recipe(recipe, kv_cache_dtype=quantization_plan(recipe)["kv_cache_dtype"])
        estimate.with_device(f"{tp} x {current.name}", current.memory_bytes * tp).check_fits(
            hint="raise tensorrt.tensor_parallel_size, quantize, or lower the batch size or sequence length"
        )
        return current

    def export(self, recipe: Recipe, checkpoint: Path, workdir: Path) -> ExportResult:
        plan = self.plan(recipe)
        gpus = detect_gpus()
        gpu = self.check_build_gpu(recipe, gpus) if gpus else None
        engine_dir = workdir / ENGINE_DIR
        with tempfile.TemporaryDirectory(prefix=".llmopt-quantized-", dir=workdir.parent) as scratch:
            source = checkpoint
            calibration = plan["calibration"]
            calibration_report = None
            if calibration:
                from llmopt.modelopt_ckpt import calibration_texts, quantize_checkpoint

                with events.step("calibrate", f"ModelOpt {calibration['algo']} calibration on {calibration['num_samples']} samples"):
                    report = quantize_checkpoint(
                        checkpoint, Path(scratch) / "quantized", calibration["algo"],
                        calibration_texts(recipe.quantization.dataset, calibration["num_samples"]),
                        kv_cache="fp8" if plan["quant_config"]["kv_cache_quant_algo"] == "FP8" else None,
                        block_size=recipe.quantization.group_size, dtype=recipe.precision.dtype,
                        device=calibration["device"], max_samples=calibration["num_samples"],
                        max_length=calibration["max_length"],
                    )
                    calibration_report = report.to_dict()
                    source = Path(report.out_dir)
            with events.step("build", f"TensorRT-LLM engine for {gpu.name if gpu else 'this GPU'}"):
                build_engine(source, engine_dir, plan)
        versions = engine_versions()
        return ExportResult(
            io={"batch_size": recipe.shapes.batch_size, "max_input_len": plan["build_config"]["max_input_len"],
                "max_seq_len": plan["build_config"]["max_seq_len"]},
            runtime={
                "loader": "tensorrt_llm._tensorrt_engine.LLM",
                "engine_dir": ENGINE_DIR,
                "gpu": None if gpu is None else gpu_record(gpu),
                "versions": versions,
                "tensor_parallel_size": recipe.tensorrt.tensor_parallel_size,
                "dtype": plan["llm"]["dtype"],
                "build_config": plan["build_config"],
                "quant_config": plan["quant_config"],
                "calibration": calibration_report,
            },
        )


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def build_engine(checkpoint: Path, engine_dir: Path, plan: dict[str, Any]) -> None:
    """``LLM(model=checkpoint, build_config=BuildConfig(...), ...)`` then ``llm.save(engine_dir)``."""
    from tensorrt_llm.llmapi import BuildConfig, QuantAlgo, QuantConfig  # noqa: PLC0415

    kwargs: dict[str, Any] = {
        "model": str(checkpoint),
        "dtype": plan["llm"]["dtype"],
        "tensor_parallel_size": plan["llm"]["tensor_parallel_size"],
        "build_config": BuildConfig(**plan["build_config"]),
    }
    quant_config = plan["quant_config"]
    if quant_config and "quant_config" in plan["llm"]:  # weight-only: TensorRT-LLM quantizes, no calibration
        kwargs["quant_config"] = QuantConfig(
            quant_algo=getattr(QuantAlgo, quant_config["quant_algo"]) if quant_config["quant_algo"] else None,
            kv_cache_quant_algo=getattr(QuantAlgo, quant_config["kv_cache_quant_algo"])
            if quant_config["kv_cache_quant_algo"] else None,
        )
    from tensorrt_llm._tensorrt_engine import LLM  # noqa: PLC0415 (the engine backend, TensorRT-LLM 1.0 - 1.2)

    llm = LLM(**kwargs)
    try:
        llm.save(str(engine_dir))
    finally:
        llm.shutdown()


def engine_versions() -> dict[str, str | None]:
    """The versions an engine is tied to (and those that made it), read from the installed distributions."""
    return {
        "tensorrt_llm": version_of("tensorrt_llm"),
        "tensorrt": installed_tensorrt_version(),
        "nvidia-modelopt": version_of("nvidia-modelopt"),
        "torch": version_of("torch"),
    }
