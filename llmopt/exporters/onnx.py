"""The ONNX target: onnxruntime-genai's model builder, run by onnxruntime-genai's own loop.

The builder writes one fused graph (GroupQueryAttention with rotary embeddings inside, packed
QKV) whose key/value cache is one buffer per layer, allocated once at ``search.max_length`` and
shared by past and present. We then pin the artifact to the recipe: the graph's batch dimension
becomes ``batch_size`` and ``search.max_length`` becomes ``sequence_length``, so the cache holds
exactly what the artifact promises. ``genai_config.json`` sits beside the graph, so the artifact
also loads in plain onnxruntime-genai (``og.Model(path)``) with no llmopt code.

``shapes.static: true`` artifacts are built by ``llmopt.exporters.static`` instead. The graph is
always the fp one: int8/int4 weights are a pass over it afterwards (``llmopt.quantize.onnx``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llmopt import events
from llmopt._deps import require
from llmopt.artifact import model_type_of
from llmopt.errors import MissingDependencyError, RecipeError
from llmopt.exporters.base import TOKENIZER_FILES, Exporter, ExportResult
from llmopt.hardware import detect_gpus
from llmopt.recipe import Recipe

LOADER = "onnxruntime-genai"
BUILDER = "onnxruntime_genai.models.builder.create_model"
MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
BATCH_DIMENSION = "batch_size"  # the builder's name for the batch dimension of every input and output
BUILDER_OPSET = 21  # the builder writes this opset; it has no option to change it
# The builder's execution providers for the recipe's providers (tensorrt: see check).
BUILDER_PROVIDERS = {"cpu": "cpu", "cuda": "cuda"}
# What ``onnxruntime.get_available_providers()`` lists when a GPU provider can run.
ORT_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_HINT = "provider {provider} needs onnxruntime-gpu and an NVIDIA GPU (pip install 'llmopt[gpu]')"


OLMO_LAYER_NORM_EPS = 1e-5  # transformers' OlmoLayerNorm
LM_HEAD_NODE = "/lm_head/MatMul"  # the builder's names
LOGITS_OUTPUT = "logits"


class OnnxExporter(Exporter):
    target = "onnx"
    extra = "onnx"
    backend_distributions = ("onnxruntime", "onnxruntime-genai", "onnx")
    backend = "the onnxruntime-genai model builder"

    def check(self, recipe: Recipe) -> None:
        if recipe.shapes.static:
            from llmopt.exporters.static import check_static

            check_static(recipe, "onnx")
            return
        provider, dtype = recipe.onnx.provider, recipe.precision.dtype
        if provider == "tensorrt":
            raise RecipeError(
                "onnx.provider 'tensorrt' is not supported by the onnxruntime-genai runtime; accepted: cpu, cuda",
                hint="set shapes.static: true (static graphs compiled by onnxruntime's TensorRT execution provider), "
                     "or target tensorrt for TensorRT-LLM engines",
            )
        if dtype != "fp32" and provider != "cuda":
            # The builder emits GroupQueryAttention on CPU only in fp32; its fp16 CPU graph does not run.
            raise RecipeError(
                f"precision.dtype '{dtype}' needs onnx.provider cuda; accepted with provider {provider}: fp32",
                hint="set precision.dtype: fp32, or onnx.provider: cuda",
            )
        if recipe.onnx.opset not in (None, BUILDER_OPSET):
            raise RecipeError(
                f"onnx.opset {recipe.onnx.opset}: the onnxruntime-genai model builder writes opset {BUILDER_OPSET}; "
                "leave onnx.opset unset",
                hint="or set shapes.static: true, whose exporter honours onnx.opset",
            )

    def plan(self, recipe: Recipe) -> dict[str, Any]:
        if recipe.shapes.static:
            from llmopt.exporters.static import static_plan

            return static_plan(recipe, "onnx")
        self.check(recipe)
        shapes = recipe.shapes
        return {
            "builder": {
                "call": BUILDER,
                "model_name": None,
                "input_path": f"<local checkpoint of {recipe.model.id}>",
                "output_dir": "<artifact>",
                "precision": recipe.precision.dtype,
                "execution_provider": BUILDER_PROVIDERS[recipe.onnx.provider],
                "cache_dir": "<temporary directory, removed after export>",
                "extra_options": builder_options(recipe),
            },
            "post_process": {
                MODEL_FILE: {"inputs and outputs": f"dimension '{BATCH_DIMENSION}' fixed to {shapes.batch_size}"},
                GENAI_CONFIG: {
                    "search.max_length": shapes.sequence_length,
                    "search.past_present_share_buffer": "true (the builder's GroupQueryAttention graphs)",
                    "model.context_length": f">= {shapes.sequence_length} (checked)",
                },
                "tokenizer": "the checkpoint's own tokenizer files replace the builder's re-saved copies",
            },
            "runtime": runtime_options(recipe),
        }

    def preflight(self, recipe: Recipe) -> None:
        require("onnx", extra=self.extra)
        ort = require("onnxruntime", extra=self.extra)
        if not recipe.shapes.static:
            require("onnxruntime_genai", extra=self.extra, package="onnxruntime-genai")
            require("onnx_ir", extra=self.extra, package="onnx-ir")  # the model builder imports it
        provider = recipe.onnx.provider
        if provider in ORT_PROVIDERS:
            # get_available_providers() says how onnxruntime was built, not that a GPU is there: check both.
            if ORT_PROVIDERS[provider] not in ort.get_available_providers():
                raise MissingDependencyError(GPU_HINT.format(provider=provider))
            if not detect_gpus():
                raise MissingDependencyError(f"onnx.provider {provider} needs an NVIDIA GPU to build and validate on; "
                                             "this machine has none (nvidia-smi finds no GPU)")
        if provider == "cuda" and not recipe.shapes.static:
            og = require("onnxruntime_genai", extra=self.extra, package="onnxruntime-genai")
            if not og.is_cuda_available():  # how the package was built: onnxruntime-genai (CPU) vs -cuda
                raise MissingDependencyError(GPU_HINT.format(provider=provider) + " and onnxruntime-genai-cuda")

    def export(self, recipe: Recipe, checkpoint: Path, workdir: Path) -> ExportResult:
        if recipe.shapes.static:
            from llmopt.exporters.static import export_static

            return export_static(recipe, checkpoint, workdir, "onnx")
        shapes = recipe.shapes
        check_context_length(checkpoint, shapes.sequence_length)
        run_builder(recipe, checkpoint, workdir)
        mend_builder_graph(checkpoint, workdir / MODEL_FILE)
        logits = project_last_token_only(workdir / MODEL_FILE)
        io_shapes = pin_batch_dimension(workdir / MODEL_FILE, shapes.batch_size)
        pin_genai_config(workdir / GENAI_CONFIG, shapes.sequence_length)
        use_checkpoint_tokenizer(checkpoint, workdir)
        return ExportResult(io=io_shapes, runtime={**runtime_options(recipe), "logits": logits})


def builder_options(recipe: Recipe) -> dict[str, Any]:
    # hf_token "false": never send a token anywhere; hf_remote: the builder trusts remote code unless told not to.
    return {"hf_token": "false", "hf_remote": recipe.model.trust_remote_code}


def runtime_options(recipe: Recipe) -> dict[str, Any]:
    return {"loader": LOADER, "provider": recipe.onnx.provider, "config": GENAI_CONFIG, "model": MODEL_FILE}


def check_context_length(checkpoint: Path, sequence_length: int) -> None:
    """The builder sizes its rotary tables to the model's context; a longer artifact cannot exist."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    context = config.get("seq_length") or config.get("max_position_embeddings")
    if context and sequence_length > int(context):
        raise RecipeError(
            f"shapes.sequence_length {sequence_length} exceeds the model's context length {context}",
            hint=f"set shapes.sequence_length to at most {context}",
        )


def run_builder(recipe: Recipe, checkpoint: Path, workdir: Path) -> None:
    """Call the model builder; its prints and progress bars stay off stdout (results only), shown with LLMOPT_DEBUG."""
    require("onnx_ir", extra="onnx", package="onnx-ir")
    builder = require("onnxruntime_genai.models.builder", extra="onnx", package="onnxruntime-genai")
    events.info(f"building the ONNX graph with onnxruntime-genai's model builder ({recipe.precision.dtype}, "
                f"{recipe.onnx.provider})")
    with tempfile.TemporaryDirectory(prefix="llmopt-onnx-") as scratch, events.backend_output_hidden():
        builder.create_model(
            None,
            str(checkpoint),
            str(workdir),
            recipe.precision.dtype,
            BUILDER_PROVIDERS[recipe.onnx.provider],
            str(Path(scratch) / "cache"),
            **builder_options(recipe),
        )


def mend_builder_graph(checkpoint: Path, model_path: Path) -> None:
    """Correct what the pinned builder gets wrong for an architecture (found by the exact-parity tests).

    OLMo: its norms are LayerNorms without weights (``OlmoLayerNorm``: mean removed, eps 1e-5); the
    builder's ``OLMoModel`` (onnxruntime-genai 0.11, ``builders/olmo.py``) gives them unit weights but
    keeps the RMS form (``SimplifiedLayerNormalization``, eps 1e-6): top-1 0.29 against PyTorch on a
    tiny OLMo. The RMS nodes become LayerNormalization / SkipLayerNormalization, whose inputs
    (x, [skip], weight) and used outputs sit at the same positions.
    """
    if model_type_of(checkpoint) != "olmo":
        return
    onnx = require("onnx", extra="onnx")
    model = onnx.load(str(model_path), load_external_data=False)
    replacements = {"SimplifiedLayerNormalization": "LayerNormalization",
                    "SkipSimplifiedLayerNormalization": "SkipLayerNormalization"}
    for node in model.graph.node:
        if node.op_type in replacements:
            node.op_type = replacements[node.op_type]
            for attribute in node.attribute:
                if attribute.name == "epsilon":
                    attribute.f = OLMO_LAYER_NORM_EPS
    onnx.save(model, str(model_path))


def project_last_token_only(model_path: Path) -> str:
    """Run the lm_head on each row's last prompt token only; return what the ``logits`` output holds.

    The builder's graph projects every prompt position onto the vocabulary, and onnxruntime-genai
    0.11 reads one of them: the row's last token. Here the lm_head's input is gathered at that
    position first (``Min(ReduceSum(attention_mask) - 1, S - 1)``: the last real token of a
    right-padded prompt that starts the sequence, position 0 of a decode step), and the logits
    output keeps its ``[batch, S, vocab]`` shape, which onnxruntime-genai 0.11 binds, as that row
    repeated over S (an Expand: a copy, cheaper than any scatter). Prefill then costs one lm_head row
    instead of S. Teacher-forced logits of every position (the parity check) come token by token
    (``OnnxRunner.logits``). A graph without the builder's ``/lm_head/MatMul`` is left whole.
    """
    onnx = require("onnx", extra="onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    nodes = list(graph.node)
    lm_head = next((node for node in nodes if node.name == LM_HEAD_NODE), None)
    producer = next((node for node in nodes if LOGITS_OUTPUT in node.output), None)
    if lm_head is None or producer is None or "attention_mask" not in {value.name for value in graph.input}:
        return "all positions"
    hidden, prefix = lm_head.input[0], "/lm_head/last_token"

    def name(part: str) -> str:
        return f"{prefix}/{part}"

    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], dtype=np.int64), name("one")),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), name("row_axes")),
    ])
    gather = [
        helper.make_node("ReduceSum", ["attention_mask", name("one")], [name("lengths")], keepdims=0),  # [B]
        helper.make_node("Sub", [name("lengths"), name("one")], [name("last_real")]),
        helper.make_node("Shape", [hidden], [name("S")], start=1, end=2),  # [1]
        helper.make_node("Sub", [name("S"), name("one")], [name("last_new")]),
        helper.make_node("Min", [name("last_real"), name("last_new")], [name("position")]),  # [B]
        helper.make_node("Unsqueeze", [name("position"), name("row_axes")], [name("position_3d")]),  # [B, 1, 1]
        helper.make_node("Shape", [hidden], [name("H")], start=2, end=3),
        helper.make_node("Shape", [name("position_3d")], [name("B1")], end=2),
        helper.make_node("Concat", [name("B1"), name("H")], [name("index_shape")], axis=0),
        helper.make_node("Expand", [name("position_3d"), name("index_shape")], [name("index")]),  # [B, 1, H]
        helper.make_node("GatherElements", [hidden, name("index")], [name("hidden")], axis=1),
    ]
    lm_head.input[0] = name("hidden")
    projected = name("logits")
    producer.output[list(producer.output).index(LOGITS_OUTPUT)] = projected
    expand = [  # the row's [B, 1, V] logits expanded to the [B, S, V] output
        helper.make_node("Shape", [hidden], [name("BS")], end=2),
        helper.make_node("Shape", [projected], [name("V")], start=2),
        helper.make_node("Concat", [name("BS"), name("V")], [name("logits_shape")], axis=0),
        helper.make_node("Expand", [projected, name("logits_shape")], [LOGITS_OUTPUT], name=f"{prefix}/Expand"),
    ]
    for node in gather + expand:
        node.name = node.name or f"{prefix}/{node.op_type}_{node.output[0].rsplit('/', 1)[-1]}"
    at = nodes.index(lm_head)
    graph.ClearField("node")
    graph.node.extend(nodes[:at] + gather + nodes[at:] + expand)
    onnx.save(model, str(model_path))
    return "last token"


def pin_batch_dimension(model_path: Path, batch_size: int) -> dict[str, Any]:
    """Fix the graph's batch dimension to ``batch_size``; the external weights file is not touched."""
    onnx = require("onnx", extra="onnx")
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == BATCH_DIMENSION:
                dim.dim_value = batch_size  # dim_value and dim_param are a oneof: this clears the name
    onnx.save(model, str(model_path))
    return {
        "inputs": {value.name: _shape(value) for value in graph.input},
        "outputs": {value.name: _shape(value) for value in graph.output},
    }


def _shape(value) -> list[int | str]:
    return [dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in value.type.tensor_type.shape.dim]


def pin_genai_config(path: Path, sequence_length: int) -> None:
    """The KV buffer onnxruntime-genai allocates is ``search.max_length`` long: make it sequence_length."""
    config = json.loads(path.read_text(encoding="utf-8"))
    search, model = config["search"], config["model"]
    if int(model["context_length"]) < sequence_length:
        raise RecipeError(
            f"shapes.sequence_length {sequence_length} exceeds the model's context length {model['context_length']}",
            hint=f"set shapes.sequence_length to at most {model['context_length']}",
        )
    search["max_length"] = sequence_length
    # Only GroupQueryAttention graphs can share past and present; the builder says which it wrote.
    if search.get("past_present_share_buffer") is not True:
        events.warning("the model builder did not emit GroupQueryAttention: past/present buffers are not shared")
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def use_checkpoint_tokenizer(checkpoint: Path, workdir: Path) -> None:
    """The builder re-saves the tokenizer through transformers; ship the checkpoint's own files instead.

    Files only the builder wrote (a tokenizer.json converted from a sentencepiece model, say) stay.
    """
    for name in TOKENIZER_FILES:
        source = checkpoint / name
        if source.is_file():
            shutil.copy2(source, workdir / name)
