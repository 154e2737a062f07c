"""AWS Inferentia2 / Trainium: compile with optimum-neuron's ``NeuronModelForCausalLM``.

The recipe's shapes and precision become optimum-neuron's export arguments, the way the
optimum-neuron Llama-2 guide writes them (https://huggingface.co/blog/inferentia-llama2):

    compiler_args = {"num_cores": 24, "auto_cast_type": "fp16"}
    input_shapes = {"batch_size": 1, "sequence_length": 2048}
    model = NeuronModelForCausalLM.from_pretrained("meta-llama/Llama-2-13b-hf", export=True,
                                                   **compiler_args, **input_shapes)

optimum-neuron 0.4 (the NxD backend) replaced that call with two steps, which this exporter uses
whenever the installed optimum-neuron has them::

    neuron_config = NeuronModelForCausalLM.get_neuron_config(checkpoint, config=config, batch_size=...,
                        sequence_length=..., tensor_parallel_size=..., instance_type="inf2")
    model = NeuronModelForCausalLM.export(checkpoint, neuron_config, config=config, load_weights=False)
    model.save_pretrained(artifact)

``tensor_parallel_size`` is always passed (0.4 otherwise takes every core of the build host). The
precision is ``auto_cast_type`` in the guide and in optimum-neuron 0.3/0.4.0; from 0.4.1 on it is
the model config's ``torch_dtype``, which this exporter sets on the config it passes. Only greedy
and top-k/top-p/temperature sampling exist on Neuron; weight quantization (int8/int4/fp8) is not
part of optimum-neuron's causal-LM export, so such recipes are refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from llmopt import events, memory
from llmopt._deps import install_hint, version_of
from llmopt.errors import MissingDependencyError, RecipeError
from llmopt.exporters.base import Exporter, ExportResult
from llmopt.hardware import NEURON_CORE_V2_MEMORY_BYTES, REPETITION_PENALTY_REFUSED, NeuronInstance, neuron_device_present, neuron_instance
from llmopt.recipe import Recipe

GUIDE_URL = "https://huggingface.co/blog/inferentia-llama2"
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
        if recipe.generation.repetition_penalty != 1.0:
            raise RecipeError(REPETITION_PENALTY_REFUSED.format(where="recipe field 'generation.repetition_penalty'"))
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
        estimate = memory.estimate_for_recipe(recipe, kv_cache_dtype=recipe.precision.dtype)
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
        if recipe.neuron.compile_only and instance is not None:
            env["NEURON_PLATFORM_TARGET_OVERRIDE"] = instance.family
        return {
            "backend": "optimum-neuron",
            "reference": GUIDE_URL,
            "calls": [
                "config = AutoConfig.from_pretrained(checkpoint).get_text_config(); config.torch_dtype = <torch_dtype>",
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
            # optimum-neuron>=0.4.1 reads the precision from the config; 0.3 and 0.4.0 also take auto_cast_type.
            "torch_dtype": TORCH_DTYPES[dtype],
            "auto_cast_type": AUTO_CAST_TYPES[dtype],
            "export": {"load_weights": False},
            # The guide's form, used as is by optimum-neuron releases without get_neuron_config/export.
            "compiler_args": compiler_args,
            "input_shapes": input_shapes,
            "legacy_from_pretrained": {"export": True, **compiler_args, **input_shapes},
            "env": env,
            "instance": None if instance is None else {
                "type": instance.name, "family": instance.family, "neuron_cores": instance.neuron_cores,
                "device_memory_gib": instance.device_memory_bytes // 2**30,
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
        new_api = api_used == "get_neuron_config+export"
        return ExportResult(
            io={"batch_size": recipe.shapes.batch_size, "sequence_length": recipe.shapes.sequence_length,
                "padding_side": "right" if new_api else "left"},
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
                # optimum-neuron>=0.4 refuses left padding; the older backend wanted it.
                "padding_side": "right" if new_api else "left",
            },
        )


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def compile_model(model_class, checkpoint: Path, plan: dict[str, Any]):
    """Run the export with whichever API the installed optimum-neuron has; returns (model, api name)."""
    if hasattr(model_class, "get_neuron_config") and hasattr(model_class, "export"):
        import torch
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(checkpoint))
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        dtype = getattr(torch, plan["torch_dtype"])
        for attribute in ("dtype", "torch_dtype"):  # transformers>=4.56 renamed torch_dtype to dtype
            with contextlib.suppress(AttributeError, TypeError):
                setattr(config, attribute, dtype)
        parameters = inspect.signature(model_class.get_neuron_config).parameters
        kwargs = {key: value for key, value in plan["get_neuron_config"].items() if key in parameters and value is not None}
        if "auto_cast_type" in parameters:
            kwargs["auto_cast_type"] = plan["auto_cast_type"]
        neuron_config = model_class.get_neuron_config(str(checkpoint), config=config, **kwargs)
        model = model_class.export(str(checkpoint), neuron_config, config=config, **plan["export"])
        return model, "get_neuron_config+export"
    model = model_class.from_pretrained(str(checkpoint), **plan["legacy_from_pretrained"])
    return model, "from_pretrained(export=True)"
