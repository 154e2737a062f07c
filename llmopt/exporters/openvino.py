"""The OpenVINO target: optimum-intel's stateful export, run by openvino-genai's LLMPipeline.

optimum-intel traces the checkpoint into one IR whose key/value cache lives in internal state
(inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``beam_idx``). We pin the batch
dimension of those inputs to ``batch_size`` in the IR's XML (the .bin optimum-intel wrote is the
artifact's as is) and keep the weights exactly as the recipe asks: fp32 as is, fp16 traced in fp16
(from an fp32 checkpoint: traced in fp32 and compressed when optimum-intel saves the IR), bf16 traced
and stored in bf16, and never optimum-intel's automatic int8 compression of models over a billion
parameters. openvino-tokenizers writes ``openvino_tokenizer.xml`` / ``openvino_detokenizer.xml``
beside the model, so the artifact also loads in plain ``openvino_genai.LLMPipeline(path, "CPU")``
with no llmopt code.

OpenVINO's CPU plugin runs fp32 IR in bf16 on CPUs that have it, and keeps the f16 key/value
cache optimum-intel writes into the IR's rt_info, unless told otherwise; so an fp32 artifact
records ``INFERENCE_PRECISION_HINT: f32`` and ``KV_CACHE_PRECISION: f32`` for the runner. The IR
itself keeps optimum-intel's f16 cache option: a KV_CACHE_PRECISION f32 there makes openvino-genai's
paged attention refuse to compile under the default bf16 hint, and a plain ``LLMPipeline(path)``
then falls back, silently, to the stateful loop, which cannot run a pinned batch.

``shapes.static: true`` artifacts are built by ``llmopt.exporters.static`` instead. The IR is
always the fp one: int8/int4 weights are a pass over it afterwards (``llmopt.quantize.openvino``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator
from xml.etree import ElementTree

from llmopt import events, sources
from llmopt._deps import require
from llmopt.architectures import soft_capped
from llmopt.errors import LlmoptError, RecipeError
from llmopt.exporters.base import Exporter, ExportResult
from llmopt.recipe import Recipe

LOADER = "openvino-genai"
EXPORTER = "optimum.exporters.openvino.main_export"
TASK = "text-generation-with-past"
MODEL_FILE = "openvino_model.xml"
WEIGHTS_FILE = "openvino_model.bin"
TOKENIZER_FILE = "openvino_tokenizer.xml"
DETOKENIZER_FILE = "openvino_detokenizer.xml"
DEVICES = ("CPU", "GPU", "NPU", "AUTO")
# Inputs of the stateful IR and where their batch dimension is; -1 leaves the sequence dynamic.
# position_ids is optional: some architectures (nemotron) derive positions from the mask.
BATCHED_INPUTS = {"input_ids": 2, "attention_mask": 2, "position_ids": 2, "beam_idx": 1}
REQUIRED_INPUTS = ("input_ids", "attention_mask", "beam_idx")
# Runtime properties per precision. fp16 keeps the device default (bf16 or f16 compute, f16 cache).
PRECISION_OPTIONS = {
    "fp32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"},
    "fp16": {},
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
}
# The torch dtype the checkpoint is traced in. fp16 follows the checkpoint's own storage: one stored in
# 16 bits is traced in fp16 (optimum-intel's 16-bit tracing, and its default for such checkpoints), so no
# fp32 copy of the model exists (a 7B fp16 model would need 28 GB for it); one stored in fp32 is traced
# as stored and compressed when optimum-intel saves the IR, because casting it peaked higher on the 371M
# bench checkpoint (3.70x its fp16 weights against 3.43x, bench/export_memory.py): the cast reads every
# page of the fp32 file while it writes the fp16 copy.
TRACE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# optimum-intel's OVConfig.dtype: "fp16" compresses the weights when it saves the IR, which is the
# artifact's .bin as is; None keeps the traced dtype.
OPTIMUM_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": None}


class OpenVINOExporter(Exporter):
    target = "openvino"
    extra = "openvino"
    backend_distributions = ("openvino", "openvino-tokenizers", "openvino-genai", "optimum-intel", "nncf")
    backend = "optimum-intel"

    def check(self, recipe: Recipe) -> None:
        if recipe.shapes.static:
            from llmopt.exporters.static import check_static

            check_static(recipe, "openvino")
        device = recipe.openvino.device
        if device not in DEVICES:
            raise RecipeError(f"openvino.device '{device}' is not an OpenVINO device; accepted: {', '.join(DEVICES)}")
        backend = str(recipe.openvino.ov_config.get("ATTENTION_BACKEND", "PA")).upper()
        if backend == "SDPA" and recipe.shapes.batch_size > 1 and not recipe.shapes.static:
            # The stateful SDPA loop drops finished rows from the batch, which a pinned batch refuses.
            raise RecipeError(
                "openvino.ov_config ATTENTION_BACKEND 'SDPA' cannot run a pinned batch_size above 1; accepted: PA",
                hint="remove ATTENTION_BACKEND from openvino.ov_config, or set shapes.batch_size: 1",
            )

    def plan(self, recipe: Recipe) -> dict[str, Any]:
        if recipe.shapes.static:
            from llmopt.exporters.static import static_plan

            return static_plan(recipe, "openvino")
        self.check(recipe)
        dtype = recipe.precision.dtype
        return {
            "export": {
                "call": EXPORTER,
                "model_name_or_path": f"<local checkpoint of {recipe.model.id}>",
                "output": "<temporary directory inside the artifact, removed after export>",
                "task": TASK,
                "stateful": True,
                "ov_config": {"dtype": OPTIMUM_DTYPES[dtype], "quantization_config": None},
                "model_loading_kwargs": {"torch_dtype": TRACE_DTYPES[dtype] if dtype != "fp16" else
                                         "float16 if the checkpoint stores 16-bit weights, else float32"},
                "local_files_only": True,
                "trust_remote_code": recipe.model.trust_remote_code,
                "weights": "no compression (an explicit ov_config turns off optimum-intel's int8 default above 1B parameters)",
            },
            "reshape": reshape_shapes(recipe.shapes.batch_size),
            "pin": {
                "edit": f"the Parameter shapes in {MODEL_FILE}",
                "weights": f"{WEIGHTS_FILE} as optimum-intel saved it (moved, not saved again)",
            },
            "tokenizer": {
                "call": "openvino_tokenizers.convert_tokenizer",
                "with_detokenizer": True,
                "skip_special_tokens": True,
                "files": [TOKENIZER_FILE, DETOKENIZER_FILE],
            },
            "runtime": runtime_options(recipe),
        }

    def preflight(self, recipe: Recipe) -> None:
        require("openvino", extra=self.extra)
        if recipe.shapes.static:
            return
        require("openvino_tokenizers", extra=self.extra, package="openvino-tokenizers")
        require("openvino_genai", extra=self.extra, package="openvino-genai")
        require("optimum.intel", extra=self.extra, package="optimum-intel")

    def export(self, recipe: Recipe, checkpoint: Path, workdir: Path) -> ExportResult:
        if recipe.shapes.static:
            from llmopt.exporters.static import export_static

            return export_static(recipe, checkpoint, workdir, "openvino")
        soft_capped = soft_capped_attention(checkpoint)
        if soft_capped and recipe.shapes.batch_size > 1:
            raise RecipeError(
                "shapes.batch_size above 1 is not supported on openvino for models with soft-capped attention "
                "(Gemma 2): their eager-traced IR runs only in the stateful SDPA pipeline; accepted: 1",
                hint="set shapes.batch_size: 1, or use target onnx")
        traced = workdir / "optimum-export"
        run_optimum_export(recipe, checkpoint, traced)
        shapes = pin_batch_dimension(recipe, traced, workdir)
        for path in traced.iterdir():  # config.json, generation_config.json, tokenizer files
            if path.name.startswith("openvino_model."):
                continue
            original = checkpoint / path.name  # the checkpoint's own file, not optimum-intel's re-saved copy
            if original.is_file():
                shutil.copy2(original, workdir / path.name)
            else:
                shutil.move(path, workdir / path.name)
        shutil.rmtree(traced)
        convert_tokenizer(checkpoint, workdir, recipe.model.trust_remote_code)
        write_optimum_config(recipe, workdir)
        runtime = runtime_options(recipe)
        if soft_capped:  # no ScaledDotProductAttention op for the paged-attention pipeline to replace
            runtime["ov_config"] = {"ATTENTION_BACKEND": "SDPA", **runtime["ov_config"]}
        return ExportResult(io=shapes, runtime=runtime)


def reshape_shapes(batch_size: int) -> dict[str, list[int]]:
    return {name: [batch_size, -1][:rank] for name, rank in BATCHED_INPUTS.items()}


def runtime_options(recipe: Recipe) -> dict[str, Any]:
    """How the runner opens the artifact: the recipe's ov_config wins over the precision defaults."""
    ov_config = {**PRECISION_OPTIONS[recipe.precision.dtype], **recipe.openvino.ov_config}
    return {
        "loader": LOADER,
        "model": MODEL_FILE,
        "tokenizer": TOKENIZER_FILE,
        "detokenizer": DETOKENIZER_FILE,
        "device": recipe.openvino.device,
        "ov_config": ov_config,
        # openvino-genai's default scheduler reuses cached prompt prefixes across calls, which would
        # make a repeated prompt's time to first token meaningless.
        "scheduler_config": {"enable_prefix_caching": False},
    }


def soft_capped_attention(checkpoint: Path) -> bool:
    return soft_capped(json.loads((checkpoint / "config.json").read_text(encoding="utf-8")))


@contextlib.contextmanager
def traced_attention(checkpoint: Path) -> Iterator[None]:
    """Trace soft-capped attention (Gemma 2) with transformers' eager attention.

    optimum-intel 1.27 forces sdpa on gemma2 (``FORCE_ATTN_MODEL_CLASSES`` in
    ``optimum/exporters/openvino/__main__.py``), and transformers' sdpa attention drops
    ``attn_logit_softcapping`` silently: the IR would not compute the model (top-1 0.27 against it
    on a tiny Gemma 2 with a cap of 2). The eager trace keeps the cap; the table is restored after.
    The eager IR has no ScaledDotProductAttention op, so openvino-genai runs it in its stateful
    pipeline (``ATTENTION_BACKEND: SDPA``) rather than the paged-attention one.
    """
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    if not soft_capped(config):
        yield
        return
    forced = require("optimum.exporters.openvino.__main__", extra="openvino", package="optimum-intel").FORCE_ATTN_MODEL_CLASSES
    model_type, before = config["model_type"], forced.get(config["model_type"])
    forced[model_type] = "eager"
    try:
        yield
    finally:
        if before is None:
            forced.pop(model_type, None)
        else:
            forced[model_type] = before


def run_optimum_export(recipe: Recipe, checkpoint: Path, output: Path) -> None:
    torch = require("torch", extra="openvino")
    main_export = require("optimum.exporters.openvino", extra="openvino", package="optimum-intel").main_export
    configuration = require("optimum.intel.openvino.configuration", extra="openvino", package="optimum-intel")
    dtype = recipe.precision.dtype
    traced_in = trace_dtype(dtype, checkpoint)
    events.info(f"tracing {recipe.model.id} with optimum-intel ({dtype}, in {traced_in}, stateful)")
    with events.backend_output_hidden(), traced_attention(checkpoint):
        main_export(
            str(checkpoint),
            output=output,
            task=TASK,
            stateful=True,
            # An explicit OVConfig with no quantization_config: optimum-intel then skips its int8 default.
            ov_config=configuration.OVConfig(dtype=OPTIMUM_DTYPES[dtype]),
            # optimum-intel 1.27 reads torch_dtype (not dtype) to set up its 16-bit tracing.
            model_loading_kwargs={"torch_dtype": getattr(torch, traced_in)},
            local_files_only=True,
            trust_remote_code=recipe.model.trust_remote_code,
            library_name="transformers",
            convert_tokenizer=False,  # done below, where a failure is an error rather than a debug log line
        )
    if not (output / MODEL_FILE).is_file():
        raise LlmoptError(f"optimum-intel wrote no {MODEL_FILE} for {recipe.model.id}")


def trace_dtype(dtype: str, checkpoint: Path) -> str:
    """The torch dtype optimum-intel loads the checkpoint in for a recipe's precision (see TRACE_DTYPES)."""
    if dtype == "fp16" and sources.stored_dtype(checkpoint) not in ("fp16", "bf16"):
        return "float32"
    return TRACE_DTYPES[dtype]


def pin_batch_dimension(recipe: Recipe, traced: Path, workdir: Path) -> dict[str, Any]:
    """Fix the batch dimension of the IR's inputs in its XML alone; return the io shapes.

    A reshape and ``openvino.save_model`` would write the .bin again, reading every page of the
    memory-mapped weights (the whole model resident a second time); Parameter shapes live in the XML.
    """
    ov = require("openvino", extra="openvino")
    tree = ElementTree.parse(traced / MODEL_FILE)
    parameters = [layer for layer in tree.iter("layer") if layer.get("type") == "Parameter"]
    names = {name for layer in parameters for name in port_names(layer)}
    missing = sorted(set(REQUIRED_INPUTS) - names)
    if missing:
        raise LlmoptError(f"the exported IR lacks the stateful inputs {', '.join(missing)} (has {', '.join(sorted(names))})")
    for layer in parameters:
        if set(port_names(layer)) & set(BATCHED_INPUTS):
            pin_first_dimension(layer, recipe.shapes.batch_size)
    shutil.move(traced / WEIGHTS_FILE, workdir / WEIGHTS_FILE)
    tree.write(workdir / MODEL_FILE, encoding="utf-8", xml_declaration=True)
    model = ov.Core().read_model(workdir / MODEL_FILE)  # the weights stay mapped, unread
    pinned = reshape_shapes(recipe.shapes.batch_size)
    wrong = sorted(name for name in names & set(pinned) if model.input(name).get_partial_shape() != ov.PartialShape(pinned[name]))
    if wrong:
        raise LlmoptError(f"OpenVINO reads the pinned IR's inputs {', '.join(wrong)} with other shapes than {pinned}")
    return {
        "inputs": {port.get_any_name(): str(port.get_partial_shape()) for port in model.inputs},
        "outputs": {port.get_any_name(): str(port.get_partial_shape()) for port in model.outputs},
        "states": len(model.get_sinks()),
    }


def port_names(parameter: ElementTree.Element) -> list[str]:
    port = parameter.find("output/port")
    return (port.get("names") or "").split(",") if port is not None else []


def pin_first_dimension(parameter: ElementTree.Element, size: int) -> None:
    """The first dimension of a Parameter layer, in its shape attribute and in its output port's dims."""
    data = parameter.find("data")
    data.set("shape", ",".join([str(size), *data.get("shape").split(",")[1:]]))
    parameter.find("output/port/dim").text = str(size)


def convert_tokenizer(checkpoint: Path, workdir: Path, trust_remote_code: bool) -> None:
    """openvino-tokenizers' tokenizer and detokenizer, with the chat template, as optimum-intel writes them."""
    ov = require("openvino", extra="openvino")
    openvino_tokenizers = require("openvino_tokenizers", extra="openvino", package="openvino-tokenizers")
    transformers = require("transformers", extra="openvino")
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"  # as optimum-intel sets it for text generation
    try:
        ov_tokenizer, ov_detokenizer = openvino_tokenizers.convert_tokenizer(
            tokenizer, with_detokenizer=True, skip_special_tokens=True
        )
    except Exception as exc:  # openvino-tokenizers raises many types for an unsupported tokenizer
        raise LlmoptError(
            f"openvino-tokenizers cannot convert the {type(tokenizer).__name__} of {checkpoint}: {exc}",
            hint="the openvino target needs a tokenizer that openvino-tokenizers supports",
        ) from exc
    from optimum.exporters.openvino.utils import set_simplified_chat_template

    set_simplified_chat_template(ov_tokenizer)  # a template openvino-genai's Jinja can read, where one is known
    ov.save_model(ov_tokenizer, workdir / TOKENIZER_FILE)
    ov.save_model(ov_detokenizer, workdir / DETOKENIZER_FILE)


def write_optimum_config(recipe: Recipe, workdir: Path) -> None:
    """openvino_config.json, so optimum-intel's OVModelForCausalLM also opens the artifact as its own."""
    configuration = require("optimum.intel.openvino.configuration", extra="openvino", package="optimum-intel")
    configuration.OVConfig(dtype=recipe.precision.dtype).save_pretrained(workdir)
