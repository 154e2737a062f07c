"""Every vendor call on the Neuron, TensorRT, ModelOpt and GPU paths exists at the versions llmopt pins.

Those paths cannot run here (no Inferentia, no NVIDIA GPU), so their calls are checked against the
vendors' own source, read as syntax trees and never imported (``tests/vendor_api.py``):

* optimum-neuron 0.4.2 and 0.4.5 (the ends of the neuron extra's range) and nvidia-modelopt 0.37.0
  (TensorRT-LLM 1.2.1's pin) and 0.47.0 (the CPU set): their published wheels, downloaded once;
* TensorRT-LLM 1.2.1: the committed snapshot of its API surface (``tests/vendor/tensorrt_llm-1.2.1.json``);
* onnxruntime's TensorRT execution provider: the option names of the onnxruntime-gpu 1.31.1 wheel
  (``tests/vendor/onnxruntime-gpu-1.31.1-tensorrt-ep.json``);
* onnxruntime-genai 0.11.4 (the ONNX target's GPU runner): its installed Python sources and bindings.

The keywords are taken from llmopt's own plans and option builders for every shipped recipe, so a
keyword renamed on either side fails here. ``python -m tests.test_vendor_conformance`` prints each
call with the vendor file and line it was checked against.
"""

from __future__ import annotations

import ast
import enum
import importlib.util
import json
from pathlib import Path

import pytest

from llmopt import modelopt_ckpt
from llmopt.errors import RecipeError
from llmopt.exporters import neuron as neuron_exporter
from llmopt.exporters import tensorrt as trt_exporter
from llmopt.exporters import tensorrt_ep
from llmopt.hardware import NEURON_PLATFORM_TARGETS
from llmopt.memory import ModelDims
from llmopt.recipe import resolve
from llmopt.runners import tensorrt as trt_runner
from llmopt.runners.base import SamplingConfig
from tests.vendor_api import SNAPSHOTS, MissingSymbol, Surface

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
OPTIMUM_NEURON_VERSIONS = ("0.4.2", "0.4.5")
MODELOPT_VERSIONS = ("0.37.0", "0.47.0")
TENSORRT_LLM_SNAPSHOT = SNAPSHOTS / "tensorrt_llm-1.2.1.json"
ORT_TENSORRT_SNAPSHOT = SNAPSHOTS / "onnxruntime-gpu-1.31.1-tensorrt-ep.json"

_surfaces: dict[str, Surface] = {}


def surface(distribution: str, version: str) -> Surface:
    key = f"{distribution}=={version}"
    if key not in _surfaces:
        _surfaces[key] = Surface.from_wheel(distribution, version)
    return _surfaces[key]


def trtllm() -> Surface:
    if "tensorrt-llm" not in _surfaces:
        _surfaces["tensorrt-llm"] = Surface.from_snapshot(TENSORRT_LLM_SNAPSHOT)
    return _surfaces["tensorrt-llm"]


def shipped(target: str) -> list:
    recipes = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        recipe = resolve(path)
        if recipe.target == target:
            recipes.append(recipe)
    return recipes


# ------------------------------------------------------------------------------ what llmopt calls


def neuron_calls() -> list[tuple[str, set[str], str]]:
    """(vendor symbol, keywords llmopt passes, where llmopt calls it) for the neuron target."""
    get_config, export = {"config"}, {"config"}
    for recipe in [*shipped("neuron"), resolve(CONFIGS / "llama2-7b-neuron-budget.yaml", {"neuron.compile_only": True})]:
        plan = neuron_exporter.NeuronExporter().plan(recipe)
        get_config |= {key for key, value in plan["get_neuron_config"].items() if value is not None}
        export |= set(plan["export"])
    model = "optimum.neuron.NeuronModelForCausalLM"
    return [
        (model, set(), "llmopt/exporters/neuron.py, llmopt/runners/neuron.py"),
        (f"{model}.get_neuron_config", get_config, "llmopt/exporters/neuron.py compile_model"),
        (f"{model}.export", export, "llmopt/exporters/neuron.py compile_model"),
        (f"{model}.save_pretrained", set(), "llmopt/exporters/neuron.py export"),
        (f"{model}.from_pretrained", set(), "llmopt/runners/neuron.py"),
        (f"{model}.generate", {"input_ids", "attention_mask", "stopping_criteria"}, "llmopt/runners/neuron.py generate"),
    ]


def modelopt_calls() -> list[tuple[str, set[str], str]]:
    configs = {name for name, _ in modelopt_ckpt.ALGORITHMS.values() if name}
    configs |= {name for name, _ in modelopt_ckpt.KV_CACHE_CONFIGS.values()}
    return [
        ("modelopt.torch.quantization.quantize", {"model", "config", "forward_loop"}, "llmopt/modelopt_ckpt.py quantize_model"),
        ("modelopt.torch.export.export_hf_checkpoint", {"model", "dtype", "export_dir"},
         "llmopt/modelopt_ckpt.py quantize_checkpoint"),
        *[(f"modelopt.torch.quantization.{name}", set(), "llmopt/modelopt_ckpt.py modelopt_config") for name in sorted(configs)],
    ]


def tensorrt_llm_calls() -> list[tuple[str, set[str], str]]:
    llm, build, quant, algos = set(), set(), set(), set()
    variants = [{}, {"quantization.weight_format": "int8", "quantization.algorithm": "rtn"},
                {"quantization.weight_format": "int4", "quantization.algorithm": "rtn"},
                {"quantization.weight_format": "int8", "quantization.algorithm": "auto"},
                {"quantization.weight_format": "int4", "quantization.algorithm": "awq"}]
    for recipe in shipped("tensorrt"):
        for overrides in variants:
            try:
                plan = trt_exporter.TensorRTExporter().plan(resolve(None, {**recipe.to_dict(), **_flatten(overrides)}))
            except RecipeError:  # e.g. an fp8 KV cache with weight-only int8: refused before any call
                continue
            llm |= set(plan["llm"])
            build |= set(plan["build_config"])
            if plan["quant_config"]:
                quant |= set(plan["quant_config"])
                algos |= {value for value in plan["quant_config"].values() if value}
            if plan["calibration"]:  # written into hf_quant_config.json by ModelOpt, read by TensorRT-LLM
                algos |= {modelopt_ckpt.ALGORITHMS[plan["calibration"]["algo"]][1]} - {None}
    sampling = set(trt_runner.sampling_options(SamplingConfig(), 8, 64, 2, 2, return_context_logits=True))
    sampling |= set(trt_runner.sampling_options(SamplingConfig(temperature=0.7), 8, 64, 2, 2))
    engine = "tensorrt_llm._tensorrt_engine.LLM"
    return [
        (engine, llm | {"model", "skip_tokenizer_init", "tensor_parallel_size"},
         "llmopt/exporters/tensorrt.py build_engine, llmopt/runners/tensorrt.py"),
        (f"{engine}.save", {"engine_dir"}, "llmopt/exporters/tensorrt.py build_engine"),
        (f"{engine}.shutdown", set(), "llmopt/exporters/tensorrt.py, llmopt/runners/tensorrt.py close"),
        (f"{engine}.generate", {"inputs", "sampling_params", "use_tqdm"}, "llmopt/runners/tensorrt.py generate"),
        (f"{engine}.generate_async", {"inputs", "sampling_params", "streaming"}, "llmopt/runners/tensorrt.py generate"),
        ("tensorrt_llm.llmapi.BuildConfig", build, "llmopt/exporters/tensorrt.py build_config_args"),
        ("tensorrt_llm.llmapi.QuantConfig", quant, "llmopt/exporters/tensorrt.py build_engine"),
        *[(f"tensorrt_llm.llmapi.QuantAlgo.{algo}", set(), "llmopt/exporters/tensorrt.py quantization_plan")
          for algo in sorted(algos)],
        ("tensorrt_llm.SamplingParams", sampling, "llmopt/runners/tensorrt.py sampling_options"),
        ("tensorrt_llm.llmapi.llm.RequestOutput.outputs", set(), "llmopt/runners/tensorrt.py generate"),
        ("tensorrt_llm.llmapi.llm.RequestOutput.context_logits", set(), "llmopt/runners/tensorrt.py logits"),
        ("tensorrt_llm.llmapi.CompletionOutput.token_ids", set(), "llmopt/runners/tensorrt.py generate"),
        ("tensorrt_llm.llmapi.CompletionOutput.finish_reason", set(), "llmopt/runners/tensorrt.py _sequence"),
    ]


def _flatten(overrides: dict) -> dict:
    data: dict = {}
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        data.setdefault(section, {})[field] = value
    return data


def accepts(symbol, keywords: set[str], extra_fields: set[str] = frozenset()) -> list[str]:
    """Keywords neither declared by the callable nor fields of the argument model it validates into."""
    return sorted(keyword for keyword in keywords if not symbol.accepts(keyword) and keyword not in extra_fields)


# ------------------------------------------------------------------------------ optimum-neuron


@pytest.mark.parametrize("version", OPTIMUM_NEURON_VERSIONS)
def test_optimum_neuron_calls_exist(version):
    source = surface("optimum-neuron", version)
    for name, keywords, caller in neuron_calls():
        symbol = source.symbol(name)
        if name.endswith(".generate"):  # sampling options go through **kwargs into the generation config
            assert symbol.var_keyword, f"{name} at {symbol.where} takes no **kwargs ({caller})"
        assert accepts(symbol, keywords) == [], f"{name} at {symbol.where} lacks {accepts(symbol, keywords)} ({caller})"


@pytest.mark.parametrize("version", OPTIMUM_NEURON_VERSIONS)
def test_platform_targets_are_optimum_neurons_own(version):
    text = surface("optimum-neuron", version).text("optimum.neuron.utils.instance")
    table = next(node.value for node in ast.walk(ast.parse(text))
                 if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INSTANCE_VALUE_MAP" for t in node.targets))
    assert ast.literal_eval(table) == NEURON_PLATFORM_TARGETS


def _neuron_head_rule(version: str):
    """optimum-neuron's get_shardable_head_counts, compiled from the wheel's gqa.py with neuronx-distributed's
    pad helper (parallel_layers/pad.py: extra heads = tp - heads % tp when heads % tp != 0)."""
    text = surface("optimum-neuron", version).text("optimum.neuron.models.inference.backend.modules.attention.gqa")
    keep = [node for node in ast.parse(text).body if isinstance(node, (ast.ClassDef, ast.FunctionDef))
            and node.name in ("GQA", "determine_sharding_strategy", "get_shardable_head_counts")]
    namespace = {"enum": enum, "get_number_of_extra_heads": lambda heads, tp: (tp - heads % tp) % tp}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "gqa.py", "exec"), namespace)  # noqa: S102 (pure functions)
    counts = namespace["get_shardable_head_counts"]
    if "determine_sharding_strategy" in namespace:
        return lambda tp, heads, kv: counts(tp, heads, kv, namespace["determine_sharding_strategy"](tp, kv))[-2:]
    return lambda tp, heads, kv: counts(tp, heads, kv)[-2:]


@pytest.mark.parametrize("version", OPTIMUM_NEURON_VERSIONS)
def test_head_padding_matches_optimum_neuron(version):
    rule = _neuron_head_rule(version)
    for heads, kv in ((32, 32), (40, 40), (32, 8), (64, 8), (28, 4), (9, 3), (14, 2)):
        for tp in (1, 2, 4, 8, 12, 16, 24, 32):
            dims = ModelDims(32000, heads * 64, 4 * heads * 64, 2, heads, kv, 64).padded_for_neuron(tp)
            assert (dims.num_heads, dims.num_kv_heads) == tuple(rule(tp, heads, kv)), (heads, kv, tp)


# ------------------------------------------------------------------------------ ModelOpt


@pytest.mark.parametrize("version", MODELOPT_VERSIONS)
def test_modelopt_calls_exist(version):
    source = surface("nvidia-modelopt", version)
    for name, keywords, caller in modelopt_calls():
        symbol = source.symbol(name)
        assert accepts(symbol, keywords) == [], f"{name} at {symbol.where} lacks {accepts(symbol, keywords)} ({caller})"


# ------------------------------------------------------------------------------ TensorRT-LLM


def test_tensorrt_llm_snapshot_names_its_release():
    data = json.loads(TENSORRT_LLM_SNAPSHOT.read_text(encoding="utf-8"))
    assert data["version"] == trt_exporter.TENSORRT_LLM_PIN and data["tag"] == f"v{data['version']}"
    assert len(data["commit"]) == 40 and data["files"]


def test_tensorrt_llm_calls_exist():
    source = trtllm()
    arguments = source.symbol("tensorrt_llm.llmapi.llm_args.TrtLlmArgs")
    for name, keywords, caller in tensorrt_llm_calls():
        symbol = source.symbol(name)
        # LLM(**kwargs) validates what its __init__ does not name into TrtLlmArgs' fields.
        extra = set(arguments.fields) if name == "tensorrt_llm._tensorrt_engine.LLM" else set()
        missing = accepts(symbol, keywords, extra)
        assert missing == [], f"{name} at {symbol.where} lacks {missing} ({caller})"


def test_tensorrt_llm_outputs_llmopt_reads():
    """llmopt/runners/tensorrt.py reads output.outputs[0].token_ids / .finish_reason and output.context_logits."""
    source = trtllm()
    for name in ("tensorrt_llm.llmapi.llm.RequestOutput.outputs", "tensorrt_llm.llmapi.llm.RequestOutput.context_logits",
                 "tensorrt_llm.llmapi.CompletionOutput.token_ids", "tensorrt_llm.llmapi.CompletionOutput.finish_reason"):
        assert source.symbol(name).line > 0


def test_a_renamed_keyword_is_caught():
    """The check itself: a keyword TensorRT-LLM does not have is reported, not waved through."""
    build = trtllm().symbol("tensorrt_llm.llmapi.BuildConfig")
    assert accepts(build, {"max_seq_len", "max_sequence_len"}) == ["max_sequence_len"]
    with pytest.raises(MissingSymbol):
        trtllm().symbol("tensorrt_llm.llmapi.QuantAlgo.W4A16_GPTQ_RENAMED")


# ------------------------------------------------------------------------------ onnxruntime (GPU)


def test_tensorrt_ep_options_are_onnxruntimes():
    known = set(json.loads(ORT_TENSORRT_SNAPSHOT.read_text(encoding="utf-8"))["tensorrt_execution_provider_options"])
    assert tensorrt_ep.OPTIONS <= known, sorted(tensorrt_ep.OPTIONS - known)
    assert set(tensorrt_ep.RESERVED) <= known
    recipe = resolve(None, {"model.id": "x/y", "target": "onnx", "shapes.static": True, "onnx.provider": "tensorrt",
                            "precision.dtype": "fp16"})
    plan = tensorrt_ep.plan(recipe, {"prefill": {"inputs": {"input_ids": {"shape": [1, 8]}}}})
    assert set(plan["build"]["prefill"]) <= known and set(plan["load_options"]) <= known


def test_onnxruntime_genai_calls_exist():
    """The onnx target's runner and builder against the installed onnxruntime-genai (the CPU build has
    the same Python API as onnxruntime-genai-cuda; nothing CUDA is loaded)."""
    og = pytest.importorskip("onnxruntime_genai")
    for owner, names in ((og.Config, ("clear_providers", "append_provider", "overlay")),
                         (og.GeneratorParams, ("set_search_options",)),
                         (og.Generator, ("append_tokens", "generate_next_token", "get_next_tokens", "get_logits",
                                         "set_logits", "get_output", "is_done")),
                         (og, ("Model", "is_cuda_available"))):
        for name in names:
            assert hasattr(owner, name), f"onnxruntime_genai has no {getattr(owner, '__name__', owner)}.{name}"
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    create = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "create_model")
    parameters = [argument.arg for argument in create.args.args]
    assert parameters[:6] == ["model_name", "input_path", "output_dir", "precision", "execution_provider", "cache_dir"]
    assert create.args.kwarg is not None  # extra_options (hf_token, hf_remote) travel as keywords


# ------------------------------------------------------------------------------ the report


def report() -> list[str]:
    lines = []
    groups = [(f"optimum-neuron=={version}", lambda version=version: surface("optimum-neuron", version), neuron_calls)
              for version in OPTIMUM_NEURON_VERSIONS]
    groups += [(f"nvidia-modelopt=={version}", lambda version=version: surface("nvidia-modelopt", version), modelopt_calls)
               for version in MODELOPT_VERSIONS]
    groups.append(("tensorrt-llm==1.2.1 (snapshot)", trtllm, tensorrt_llm_calls))
    for label, source, calls in groups:
        lines.append(f"## {label}")
        for name, keywords, caller in calls():
            symbol = source().symbol(name)
            lines.append(f"- {name}({', '.join(sorted(keywords))}) -> {symbol.where}  [{caller}]")
    return lines


if __name__ == "__main__":
    print("\n".join(report()))
