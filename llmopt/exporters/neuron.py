"""AWS Inferentia2 / Trainium: compile with optimum-neuron's ``NeuronModelForCausalLM`` (0.4.2 - 0.4.x).

The optimum-neuron Llama-2 guide (https://huggingface.co/blog/inferentia-llama2) writes a build as
``compiler_args = {"num_cores": 24, "auto_cast_type": "fp16"}`` and ``input_shapes = {"batch_size":
1, "sequence_length": 2048}``; the plan shows the recipe in that form too. optimum-neuron 0.4 (the
NxD backend) builds it in two steps, which this exporter calls::

    neuron_config = NeuronModelForCausalLM.get_neuron_config(checkpoint, config=config, batch_size=...,
                        sequence_length=..., tensor_parallel_size=..., instance_type="inf2")
    model = NeuronModelForCausalLM.export(checkpoint, neuron_config, config=config, load_weights=False)
    model.save_pretrained(artifact)

What optimum-neuron's own code decides, and llmopt follows (checked against its wheels in
tests/test_vendor_conformance.py):
- ``tensor_parallel_size`` is always passed (unset, 0.4.1+ uses 0 cores on a host without devices).
- The precision is the config's dtype attribute (``dtype`` on transformers >= 4.56, else ``torch_dtype``).
- The compiler's platform target comes from the instance family with optimum-neuron's own map
  (inf2, trn1, trn1n -> trn1; trn2 -> trn2) and is set as ``NEURON_PLATFORM_TARGET_OVERRIDE`` before
  the import: an export refuses a mismatch, which is what a CI host without devices needs to get right.
- Attention heads are padded to a multiple of the cores (Llama-2-7B on 24 cores: 32 -> 48), and the
  memory estimate counts the padded KV cache and weights.
- Sampling runs on the device with temperature / top-k (1 to 256) / top-p only: a repetition penalty
  would be ignored silently, so it is refused. Weight quantization is not part of the causal-LM
  export, so int8/int4/fp8 recipes are refused too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from llmopt import events, memory
from llmopt._deps import dtype_keyword, install_hint, version_of
from llmopt.errors import MissingDependencyError, RecipeError
from llmopt.exporters.base import Exporter, ExportResult
from llmopt.hardware import (NEURON_CORE_V2_MEMORY_BYTES, NEURON_MAX_TOP_K, NEURON_TOP_K_REFUSED,
                             REPETITION_PENALTY_REFUSED, NeuronInstance, neuron_device_present, neuron_instance)
from llmopt.recipe import Recipe

GUIDE_URL = "https://huggingface.co/blog/inferentia-llama2"
# The releases this exporter is written and checked against (tests/test_vendor_conformance.py reads
# their wheels): 0.4.2 is the first whose save_pretrained works with the config dtype it reads.
OPTIMUM_NEURON_RANGE = ">=0.4.2,<0.5"
AUTO_CAST_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_CORES = 2  # one Inferentia2 / Trainium chip
# Arguments that have their own recipe field: refusing them in compiler_args avoids two sources.
_RESERVED_COMPILER_ARGS = {
    "num_cores": "neuron.num_cores", "tensor_parallel_size": "neuron.tensor_parallel_size",
    "auto_cast_type": "precision.dtype", "torch_dtype": "precision.dtype",
    "batch_size": "shapes.batch_size", "sequence_length": "shapes.sequence_length",
}
NEURON_DISTRIBUTIONS = ("optimum-neuron", "neuronx-cc", "torch-neuronx", "neuronx-distributed", "transformers-neuronx")


def resolve_cores(recipe: Recipe) -> tuple[int, NeuronInstance | None]:
    """NeuronCores to shard over: tensor_parallel_size, else num_cores, else the instance's, else 2."""
    options = recipe.neuron
    instance = neuron_instance(options.instance_type) if options.instance_type else None
    if options.num_cores and options.tensor_parallel_size and options.num_cores != options.tensor_parallel_size:
        raise RecipeError(
            f"recipe fields 'neuron.num_cores' ({options.num_cores}) and 'neuron.tensor_parallel_size' "
            f"({options.tensor_parallel_size}) disagree; they name the same thing, give one"
        )
    cores = options.tensor_parallel_size or options.num_cores or (instance.neuron_cores if instance else DEFAULT_CORES)
    return cores, instance


def neuron_cc_flags(compiler_args: dict[str, Any]) -> str | None:
    """``{optlevel: 3, enable-fast-loading-neuron-binaries: true}`` -> ``--optlevel=3 --enable-...``."""
    flags = []
    for key, value in compiler_args.items():
        if key in _RESERVED_COMPILER_ARGS:
            raise RecipeError(
                f"recipe field 'neuron.compiler_args.{key}': set it with '{_RESERVED_COMPILER_ARGS[key]}' instead"
            )
        name = key if key.startswith("-") else f"--{key.replace('_', '-')}"
        if value is True:
            flags.append(name)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            flags.extend(f"{name}={item}" for item in value)
        else:
            flags.append(f"{name}={value}")
    return " ".join(flags) or None


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, restoring the previous values."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class NeuronExporter(Exporter):
    target = "neuron"
    extra = "neuron"
    backend_distributions = ("optimum-neuron", "neuronx-cc", "torch-neuronx", "neuronx-distributed", "transformers")
    backend = "optimum-neuron"

    def validates_here(self, recipe: Recipe) -> bool:
        return False  # on-device sampling returns tokens, not the logits the parity check compares

    # ----------------------------------------------------------------------------- pure checks

    def check(self, recipe: Recipe) -> None:
        quantization = recipe.quantization
        if quantization.weight_format == "fp8":
            raise RecipeError(
                "recipe field 'quantization.weight_format': fp8 is not available on the neuron target "
                "(optimum-neuron's NeuronModelForCausalLM export has no fp8 option); set precision.dtype "
                "to fp16 or bf16 and quantization.weight_format to none"
            )
        if quantization.weight_format != "none":
            raise RecipeError(
                f"recipe field 'quantization.weight_format': {quantization.weight_format} weights are not available "
                "on the neuron target (optimum-neuron's causal-LM export compiles fp32/fp16/bf16 only); "
                "set it to none and choose precision.dtype"
            )
        if quantization.kv_cache not in ("auto", "fp32", "fp16"):
            raise RecipeError(
                f"recipe field 'quantization.kv_cache': {quantization.kv_cache} is not available on the neuron target; "
                "the KV cache takes precision.dtype (leave it auto)"
            )
        if recipe.generation.repetition_penalty not in (None, 1.0):
            raise RecipeError(REPETITION_PENALTY_REFUSED.format(where="recipe field 'generation.repetition_penalty'"))
        if recipe.generation.top_k is not None and not 1 <= recipe.generation.top_k <= NEURON_MAX_TOP_K:
            raise RecipeError(NEURON_TOP_K_REFUSED.format(where="recipe field 'generation.top_k'",
                                                          value=recipe.generation.top_k))
        cores, instance = resolve_cores(recipe)
        if instance is not None and cores > instance.neuron_cores:
            field = "neuron.tensor_parallel_size" if recipe.neuron.tensor_parallel_size else "neuron.num_cores"
            raise RecipeError(
                f"recipe field '{field}': {cores} NeuronCores requested but {instance.name} has "
                f"{instance.neuron_cores}; use at most {instance.neuron_cores} or a larger instance"
            )
        if recipe.neuron.compile_only and instance is None:
            raise RecipeError(
                "recipe field 'neuron.compile_only': compiling without a Neuron device needs "
                "neuron.instance_type (the instance the artifact will run on)"
            )
        neuron_cc_flags(recipe.neuron.compiler_args)
        self.memory_estimate(recipe).check_fits(
            hint="use more NeuronCores (neuron.tensor_parallel_size), a larger instance, or a smaller batch/sequence length"
        )

    def memory_estimate(self, recipe: Recipe) -> memory.MemoryEstimate:
        """Weights + KV cache against the memory of the NeuronCores the model is sharded over."""
        cores, instance = resolve_cores(recipe)
        estimate = memory.estimate_for_recipe(recipe, kv_cache_dtype=recipe.precision.dtype, neuron_tensor_parallel=cores)
        per_core = instance.memory_per_core_bytes if instance else NEURON_CORE_V2_MEMORY_BYTES
        where = f"of {instance.name}" if instance else "(NeuronCore-v2)"
        estimate.with_device(f"{cores} NeuronCores {where} at {per_core / 2**30:g} GiB each", cores * per_core)
        if instance is not None and estimate.weights_bytes and estimate.weights_bytes > 0.8 * instance.host_memory_bytes:
            estimate.notes.append(
                f"{instance.name} has {instance.host_memory_bytes / 2**30:g} GiB of host memory: loading "
                f"{estimate.weights_bytes / 1e9:.1f} GB of weights there may not fit (the guide uses inf2.8xlarge for 7B)"
            )
        return estimate

    def plan(self, recipe: Recipe) -> dict[str, Any]:
        cores, instance = resolve_cores(recipe)
        dtype = recipe.precision.dtype
        batch_size, sequence_length = recipe.shapes.batch_size, recipe.shapes.sequence_length
        compiler_args = {"num_cores": cores, "auto_cast_type": AUTO_CAST_TYPES[dtype]}
        input_shapes = {"batch_size": batch_size, "sequence_length": sequence_length}
        env: dict[str, str] = {}
        flags = neuron_cc_flags(recipe.neuron.compiler_args)
        if flags:
            env["NEURON_CC_FLAGS"] = flags
        if instance is not None:
            # optimum-neuron's own value for the family (inf2 -> trn1): an export refuses any other, and
            # importing optimum.neuron on a host without a device would otherwise set trn1 by itself.
            env["NEURON_PLATFORM_TARGET_OVERRIDE"] = instance.platform_target
        return {
            "backend": "optimum-neuron",
            "requires": f"optimum-neuron{OPTIMUM_NEURON_RANGE}",
            "reference": GUIDE_URL,
            "calls": [
                f"config = AutoConfig.from_pretrained(checkpoint).get_text_config(); config.{dtype_keyword()} = <torch_dtype>",
                "neuron_config = NeuronModelForCausalLM.get_neuron_config(checkpoint, config=config, **get_neuron_config)",
                "model = NeuronModelForCausalLM.export(checkpoint, neuron_config, config=config, **export)",
                "model.save_pretrained(<artifact>)",
            ],
            "get_neuron_config": {
                "batch_size": batch_size,
                "sequence_length": sequence_length,
                "tensor_parallel_size": cores,
                "instance_type": instance.family if instance else None,
            },
            "torch_dtype": TORCH_DTYPES[dtype],  # optimum-neuron>=0.4.1 reads the precision from the config
            "export": {"load_weights": False},
            # The guide's form of the same build (optimum-neuron < 0.4), for comparison with its tables.
            "compiler_args": compiler_args,
            "input_shapes": input_shapes,
            "platform_target": instance.platform_target if instance else None,
            "attention_heads": attention_heads(recipe, cores),
            "env": env,
            "instance": None if instance is None else {
                "type": instance.name, "family": instance.family, "platform_target": instance.platform_target,
                "neuron_cores": instance.neuron_cores, "device_memory_gib": instance.device_memory_bytes // 2**30,
                "host_memory_gib": instance.host_memory_bytes // 2**30,
            },
            "memory_estimate": self.memory_estimate(recipe).to_dict(),
        }

    # ----------------------------------------------------------------------------- machine

    def preflight(self, recipe: Recipe) -> None:
        """The SDK and a Neuron device, checked without importing anything (one line if missing)."""
        missing = []
        if not _module_available("optimum.neuron"):
            missing.append("optimum-neuron")
        if not (_module_available("neuronxcc") or shutil.which("neuronx-cc")):
            missing.append("the Neuron compiler (neuronx-cc)")
        if not recipe.neuron.compile_only and not neuron_device_present():
            missing.append("a Neuron device (no /dev/neuron0, neuron-ls finds none)")
        if missing:
            names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
            raise MissingDependencyError(
                f"the 'neuron' target needs {names}, not found on this machine; "
                f"install with: {install_hint('neuron')}, or set neuron.compile_only with an instance_type"
            )
        check_optimum_neuron_version(version_of("optimum-neuron"))

    def export(self, recipe: Recipe, checkpoint: Path, workdir: Path) -> ExportResult:
        plan = self.plan(recipe)
        # NEURON_PLATFORM_TARGET_OVERRIDE must be set before neuronx_distributed is imported.
        with environment(plan["env"]):
            from optimum.neuron import NeuronModelForCausalLM  # noqa: PLC0415 (the SDK is optional)

            with events.step("compile", f"neuronx-cc: {plan['get_neuron_config']['tensor_parallel_size']} NeuronCores, "
                                        f"batch {recipe.shapes.batch_size} x {recipe.shapes.sequence_length} tokens"):
                model, api_used = compile_model(NeuronModelForCausalLM, checkpoint, plan)
            model.save_pretrained(str(workdir))
        versions = {name: version_of(name) for name in NEURON_DISTRIBUTIONS}
        return ExportResult(
            io={"batch_size": recipe.shapes.batch_size, "sequence_length": recipe.shapes.sequence_length,
                "padding_side": "right"},
            runtime={
                "loader": "optimum.neuron.NeuronModelForCausalLM.from_pretrained",
                "api": api_used,
                "get_neuron_config": plan["get_neuron_config"],
                "torch_dtype": plan["torch_dtype"],
                "compiler_args": plan["compiler_args"],
                "input_shapes": plan["input_shapes"],
                "env": plan["env"],
                "instance": plan["instance"],
                "versions": versions,
                "padding_side": "right",  # optimum-neuron 0.4 decodes right-padded rows only
            },
        )


def check_optimum_neuron_version(installed: str | None) -> None:
    """optimum-neuron 0.4.0 and 0.4.1 (transformers 4.55) fail in save_pretrained on the config's dtype."""
    if installed is not None and Version(installed) not in SpecifierSet(OPTIMUM_NEURON_RANGE):
        raise MissingDependencyError(
            f"the 'neuron' target needs optimum-neuron{OPTIMUM_NEURON_RANGE}, this machine has {installed} "
            "(0.4.0 and 0.4.1 cannot save a compiled model with transformers' dtype; older releases lack the 0.4 API)",
            hint=f"install it with: {install_hint('neuron')}",
        )


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def attention_heads(recipe: Recipe, cores: int) -> dict[str, Any] | None:
    """Query and KV heads before and after optimum-neuron pads them for ``cores`` (None: model unknown)."""
    dims = memory.model_dims_for(recipe.model.id, recipe.model.revision)
    if dims is None:
        return None
    padded = dims.padded_for_neuron(cores)
    return {"heads": dims.num_heads, "kv_heads": dims.num_kv_heads, "tensor_parallel_size": cores,
            "padded_heads": padded.num_heads, "padded_kv_heads": padded.num_kv_heads,
            "per_core": {"heads": padded.num_heads // cores, "kv_heads": max(1, padded.num_kv_heads // cores)}}


def compile_model(model_class, checkpoint: Path, plan: dict[str, Any]):
    """``get_neuron_config`` then ``export`` (optimum-neuron 0.4); returns (model, api name)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint))
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    # One attribute, the installed transformers' own: on transformers < 4.56 a 'dtype' attribute is not
    # converted when the config is saved, and optimum-neuron's save_pretrained fails on it.
    setattr(config, dtype_keyword(), getattr(torch, plan["torch_dtype"]))
    kwargs = {key: value for key, value in plan["get_neuron_config"].items() if value is not None}
    neuron_config = model_class.get_neuron_config(str(checkpoint), config=config, **kwargs)
    model = model_class.export(str(checkpoint), neuron_config, config=config, **plan["export"])
    return model, "get_neuron_config+export"
