"""The neuron target without Neuron hardware: recipe -> optimum-neuron arguments, errors, memory.

The four shipped Llama-2 recipes must resolve to the optimum-neuron Llama-2 guide's arguments,
https://huggingface.co/blog/inferentia-llama2 :

    | Model type              | num cores | batch_size |
    | Llama2 7B - budget      | 2         | 1          |   (inf2.8xlarge)
    | Llama2 7B - latency     | 24        | 1          |   (inf2.48xlarge)
    | Llama2 13B - latency    | 24        | 1          |
    | Llama2 13B - throughput | 24        | 4          |
    "all models are compiled with a maximum sequence length of 2048"
    compiler_args = {"num_cores": 24, "auto_cast_type": 'fp16'}; input_shapes = {"batch_size": 1, "sequence_length": 2048}

Tests marked ``neuron`` compile and run for real; they skip unless this host has a Neuron device and
the SDK (``make install-neuron``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from llmopt import memory
from llmopt.errors import MissingDependencyError, RecipeError
from llmopt.exporters import neuron as neuron_exporter
from llmopt.hardware import GIB, NEURON_INSTANCES, neuron_device_present
from llmopt.recipe import resolve
from tests._hardening import assert_one_error_line, dry_run, failing

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GUIDE = "https://huggingface.co/blog/inferentia-llama2"

# recipe -> (model, instance, num_cores, batch_size) as the guide gives them; sequence_length 2048, fp16.
GUIDE_CONFIGURATIONS = {
    "llama2-7b-neuron-budget.yaml": ("Llama-2-7b-hf", "inf2.8xlarge", 2, 1),
    "llama2-7b-neuron-latency.yaml": ("Llama-2-7b-hf", "inf2.48xlarge", 24, 1),
    "llama2-13b-neuron-latency.yaml": ("Llama-2-13b-hf", "inf2.48xlarge", 24, 1),
    "llama2-13b-neuron-throughput.yaml": ("Llama-2-13b-hf", "inf2.48xlarge", 24, 4),
}

HAVE_NEURON = neuron_device_present() and neuron_exporter._module_available("optimum.neuron")
requires_neuron = pytest.mark.skipif(
    not HAVE_NEURON, reason="needs an Inferentia/Trainium host with the Neuron SDK (make install-neuron)"
)




@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("LLMOPT_DEBUG", raising=False)


# ------------------------------------------------------------------------------ the guide's plans


@pytest.mark.parametrize("name", sorted(GUIDE_CONFIGURATIONS))
def test_shipped_recipe_resolves_to_the_guide_arguments(capsys, name):
    model, instance, cores, batch = GUIDE_CONFIGURATIONS[name]
    code, result, err = dry_run(capsys, "--config", str(CONFIGS / name))
    assert code == 0, err
    plan = result["plan"]
    assert result["recipe"]["model"]["id"].endswith(model)
    # The guide's own dicts, verbatim (GUIDE):
    assert plan["compiler_args"] == {"num_cores": cores, "auto_cast_type": "fp16"}
    assert plan["input_shapes"] == {"batch_size": batch, "sequence_length": 2048}
    # The same values in optimum-neuron>=0.4's form, tensor_parallel_size always given:
    assert plan["get_neuron_config"] == {"batch_size": batch, "sequence_length": 2048,
                                         "tensor_parallel_size": cores, "instance_type": "inf2"}
    assert plan["torch_dtype"] == "float16"
    assert plan["export"] == {"load_weights": False}
    # optimum-neuron's own platform target for inf2 (utils/instance.py: inf2 -> trn1); no NEURON_CC_FLAGS.
    assert plan["platform_target"] == "trn1" and plan["env"] == {"NEURON_PLATFORM_TARGET_OVERRIDE": "trn1"}
    # Heads padded to a multiple of the cores (gqa.py): 32 (7B) and 40 (13B) heads become 48 on 24 cores.
    heads = plan["attention_heads"]
    expected = {2: 32, 24: 48}[cores]
    assert (heads["padded_heads"], heads["padded_kv_heads"]) == (expected, expected)
    assert heads["per_core"] == {"heads": expected // cores, "kv_heads": expected // cores}
    assert plan["instance"]["type"] == instance and plan["instance"]["neuron_cores"] >= cores
    assert plan["reference"] == GUIDE
    estimate = plan["memory_estimate"]
    assert estimate["status"] == "ok" and estimate["fits"] is True
    # The guide's sampling: do_sample=True, temperature=0.9, top_k=50, top_p=0.9.
    generation = result["recipe"]["generation"]
    assert (generation["temperature"], generation["top_k"], generation["top_p"]) == (0.9, 50, 0.9)


def test_dry_run_imports_no_neuron_library():
    code = (
        "import sys\n"
        "from llmopt.cli.main import main\n"
        f"for name in {sorted(GUIDE_CONFIGURATIONS)!r}:\n"
        "    assert main(['export', '--config', f'{sys.argv[1]}/{name}', '--dry-run', '--json']) == 0\n"
        "loaded = [m for m in sys.modules if m.startswith(('optimum.neuron', 'neuronxcc', 'torch_neuronx', 'neuronx_distributed'))]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code, str(CONFIGS)], check=True, capture_output=True, text=True)


def test_plan_flags_and_compile_only(capsys):
    code, result, err = dry_run(
        capsys, "--config", str(CONFIGS / "llama2-7b-neuron-budget.yaml"),
        "--set", "neuron.compiler_args={optlevel: 3, enable-fast-loading-neuron-binaries: true, skipped: false}",
        "--set", "neuron.compile_only=true",
    )
    assert code == 0, err
    assert result["plan"]["env"] == {
        "NEURON_CC_FLAGS": "--optlevel=3 --enable-fast-loading-neuron-binaries",
        "NEURON_PLATFORM_TARGET_OVERRIDE": "trn1",  # optimum-neuron refuses 'inf2' here: it compiles inf2 for trn1
    }


def test_cores_default_to_the_instance_and_tensor_parallel_size_is_accepted(capsys):
    recipe = resolve(overrides={"model.id": "meta-llama/Llama-2-7b-hf", "target": "neuron",
                                "neuron.instance_type": "inf2.24xlarge", "precision.dtype": "bf16"})
    plan = neuron_exporter.NeuronExporter().plan(recipe)
    assert plan["get_neuron_config"]["tensor_parallel_size"] == 12
    assert plan["compiler_args"] == {"num_cores": 12, "auto_cast_type": "bf16"} and plan["torch_dtype"] == "bfloat16"
    assert plan["attention_heads"]["padded_heads"] == 36  # 32 heads on 12 cores
    recipe = resolve(overrides={"model.id": "x/y", "target": "neuron", "neuron.tensor_parallel_size": 8})
    assert neuron_exporter.NeuronExporter().plan(recipe)["get_neuron_config"]["tensor_parallel_size"] == 8
    recipe = resolve(overrides={"model.id": "x/y", "target": "neuron"})
    assert neuron_exporter.NeuronExporter().plan(recipe)["get_neuron_config"]["tensor_parallel_size"] == 2


def test_unknown_model_has_an_unknown_memory_estimate(capsys):
    code, result, err = dry_run(capsys, "--model", "someone/private-model", "--target", "neuron")
    assert code == 0, err
    estimate = result["plan"]["memory_estimate"]
    assert estimate["status"] == "unknown" and estimate["fits"] is None
    assert "not in llmopt's table" in estimate["source"]


# ------------------------------------------------------------------------------ error paths



def test_fp8_is_refused_naming_the_fields(capsys):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-7b-neuron-budget.yaml"),
                        "--set", "quantization.weight_format=fp8", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "quantization.weight_format", "precision.dtype", "fp8")


@pytest.mark.parametrize("setting", ["quantization.weight_format=int4", "quantization.weight_format=int8",
                                     "quantization.kv_cache=fp8"])
def test_other_quantization_is_refused(capsys, setting):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-7b-neuron-budget.yaml"), "--set", setting, "--dry-run")
    assert code == 2
    assert_one_error_line(err, setting.split("=")[0])


def test_repetition_penalty_is_refused_not_ignored(capsys, tmp_path, monkeypatch):
    """On-device sampling has no repetition penalty: the recipe field and the run flag are refused in one line."""
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-7b-neuron-budget.yaml"),
                        "--set", "generation.repetition_penalty=1.2", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "generation.repetition_penalty", "neuron", "1.0")
    from llmopt.errors import UsageError
    from llmopt.runners import neuron as neuron_runner
    from llmopt.runners.base import SamplingConfig

    runner = object.__new__(neuron_runner.NeuronRunner)  # generate refuses before touching the device
    with pytest.raises(UsageError, match="--repetition-penalty: a repetition penalty is not available on the neuron"):
        runner.generate([[1, 2, 3]], SamplingConfig(repetition_penalty=1.3))


def test_tensor_parallel_size_above_the_instance_cores(capsys):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-7b-neuron-budget.yaml"),
                        "--set", "neuron.num_cores=4", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "4 NeuronCores", "inf2.8xlarge has 2")
    code, err = failing(capsys, "export", "--model", "meta-llama/Llama-2-13b-hf", "--target", "neuron",
                        "--set", "neuron.instance_type=inf2.48xlarge", "--set", "neuron.tensor_parallel_size=32", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "neuron.tensor_parallel_size", "32", "inf2.48xlarge has 24")


def test_num_cores_and_tensor_parallel_size_must_agree(capsys):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-7b-neuron-latency.yaml"),
                        "--set", "neuron.tensor_parallel_size=12", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "neuron.num_cores", "neuron.tensor_parallel_size")


def test_unknown_instance_lists_the_accepted_names(capsys):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-7b-neuron-budget.yaml"),
                        "--set", "neuron.instance_type=inf9.huge", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "inf9.huge", "inf2.xlarge", "inf2.48xlarge", "trn1.32xlarge")


def test_compiler_args_that_have_a_recipe_field_are_refused(capsys):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-7b-neuron-budget.yaml"),
                        "--set", "neuron.compiler_args={auto_cast_type: bf16}", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "neuron.compiler_args.auto_cast_type", "precision.dtype")


def test_compile_only_needs_an_instance(capsys):
    code, err = failing(capsys, "export", "--model", "x/y", "--target", "neuron", "--set", "neuron.compile_only=true", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "neuron.instance_type")


def test_a_model_that_cannot_fit_names_both_numbers(capsys):
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-13b-neuron-throughput.yaml"),
                        "--set", "neuron.instance_type=inf2.xlarge", "--set", "neuron.num_cores=2", "--dry-run")
    assert code == 2
    assert_one_error_line(err, "does not fit", "32.74 GB", "weights 26.03 GB", "KV cache 6.71 GB", "30.92 GB usable")


def test_without_the_sdk_export_fails_in_one_line_before_any_work(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(neuron_exporter, "_module_available", lambda name: False)
    monkeypatch.setattr(neuron_exporter, "neuron_device_present", lambda: False)
    monkeypatch.setattr("llmopt.sources.resolve_model", lambda *a, **k: pytest.fail("resolved the model before preflight"))
    code, err = failing(capsys, "export", "-c", str(CONFIGS / "llama2-7b-neuron-budget.yaml"), "-o", str(tmp_path / "out"))
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert_one_error_line(err, "optimum-neuron", "neuronx-cc", "Neuron device", "make install-neuron")
    assert not (tmp_path / "out").exists()


def test_without_a_device_only_the_device_is_named(monkeypatch):
    monkeypatch.setattr(neuron_exporter, "_module_available", lambda name: True)
    monkeypatch.setattr(neuron_exporter, "neuron_device_present", lambda: False)
    recipe = resolve(CONFIGS / "llama2-7b-neuron-budget.yaml")
    with pytest.raises(MissingDependencyError, match=r"needs a Neuron device .*make install-neuron") as caught:
        neuron_exporter.NeuronExporter().preflight(recipe)
    assert "optimum-neuron," not in str(caught.value)
    # compile_only skips the device check.
    neuron_exporter.NeuronExporter().preflight(resolve(CONFIGS / "llama2-7b-neuron-budget.yaml",
                                                       {"neuron.compile_only": True}))


# ------------------------------------------------------------------------------ memory


def llama2_7b_config(directory: Path) -> Path:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "torch_dtype": "float16"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_memory_estimate_llama2_7b_from_config_json(tmp_path):
    config, source = memory.find_config(str(llama2_7b_config(tmp_path / "llama")))
    assert "config.json" in source
    estimate = memory.estimate(config, batch_size=4, sequence_length=2048, dtype="fp16")
    assert estimate.parameters == 6_738_415_616  # Llama-2-7B
    assert 13.4e9 < estimate.weights_bytes < 13.6e9  # about 13.5 GB in fp16
    assert estimate.kv_cache_bytes == 4 * 2048 * 32 * 2 * 32 * 128 * 2 == 4 * GIB
    assert estimate.total_bytes == estimate.weights_bytes + estimate.kv_cache_bytes
    assert estimate.to_dict()["kv_cache_gb"] == 4.29
    one = memory.estimate(config, batch_size=1, sequence_length=2048, dtype="fp16")
    assert one.kv_cache_bytes == GIB


def test_memory_estimate_table_and_precisions():
    config, source = memory.find_config("NousResearch/Llama-2-7b-chat-hf")
    assert "Llama-2-7B" in source
    fp32 = memory.estimate(config, 1, 2048, "fp32")
    int4 = memory.estimate(config, 1, 2048, "fp16", weight_format="int4", group_size=128)
    assert fp32.weights_bytes == 2 * memory.estimate(config, 1, 2048, "fp16").weights_bytes
    assert 3.5e9 < int4.weights_bytes < 4.0e9  # int4 matmuls + fp16 embeddings and head
    fp8_kv = memory.estimate(config, 1, 2048, "fp16", kv_cache_dtype="fp8")
    assert fp8_kv.kv_cache_bytes == GIB // 2
    config13, _ = memory.find_config("meta-llama/Llama-2-13b-hf")
    assert memory.ModelDims.from_config(config13).parameters == 13_015_864_320


def test_memory_module_needs_no_torch(tmp_path):
    directory = llama2_7b_config(tmp_path / "llama")
    code = ("import sys, llmopt.memory as m; c, _ = m.find_config(sys.argv[1]); "
            "e = m.estimate(c, 4, 2048, 'fp16'); assert 'torch' not in sys.modules; print(e.weights_bytes)")
    out = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True)
    assert int(out.stdout) == 13_476_831_232
    cli = subprocess.run([sys.executable, "-m", "llmopt.memory", str(directory / "config.json"), "--batch-size", "4"],
                         capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout)["kv_cache_bytes"] == 4 * GIB


def test_instance_table():
    # https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/inf2-arch.html
    expected = {"inf2.xlarge": (2, 32), "inf2.8xlarge": (2, 32), "inf2.24xlarge": (12, 192), "inf2.48xlarge": (24, 384),
                "trn1.2xlarge": (2, 32), "trn1.32xlarge": (32, 512)}
    for name, (cores, gib) in expected.items():
        instance = NEURON_INSTANCES[name]
        assert (instance.neuron_cores, instance.device_memory_bytes // GIB) == (cores, gib)
        assert instance.memory_per_core_bytes == 16 * GIB


# ------------------------------------------------------------------------------ the export call, with stand-ins


class _FakeNeuronModel:
    calls: list = []

    def __init__(self, how):
        self.how = how

    def save_pretrained(self, directory):
        Path(directory, "model.pt").write_bytes(b"neff")
        Path(directory, "neuron_config.json").write_text("{}")
        self.calls.append(("save_pretrained", directory))


def _fake_class():
    """A stand-in with optimum-neuron 0.4.2+'s signatures (checked against the wheels in test_vendor_conformance)."""
    calls: list = []

    class NeuronModelForCausalLM:
        @classmethod
        def get_neuron_config(cls, model_name_or_path, config=None, token=None, revision=None, instance_type=None,
                              batch_size=None, sequence_length=None, tensor_parallel_size=None):
            calls.append(("get_neuron_config", model_name_or_path, dict(instance_type=instance_type, batch_size=batch_size,
                          sequence_length=sequence_length, tensor_parallel_size=tensor_parallel_size), config))
            return {"neuron": True}

        @classmethod
        def export(cls, model_id, neuron_config, config=None, token=None, revision=None, load_weights=False, **kwargs):
            calls.append(("export", model_id, neuron_config, load_weights))
            return _FakeNeuronModel("export")

    return NeuronModelForCausalLM, calls


def test_compile_model_uses_get_neuron_config_then_export(tiny_llama):
    recipe = resolve(CONFIGS / "llama2-13b-neuron-throughput.yaml")
    plan = neuron_exporter.NeuronExporter().plan(recipe)
    model_class, calls = _fake_class()
    model, api = neuron_exporter.compile_model(model_class, tiny_llama, plan)
    assert api == "get_neuron_config+export" and model.how == "export"
    (_, path, kwargs, config), export_call = calls
    assert path == str(tiny_llama)
    assert kwargs["batch_size"] == 4 and kwargs["sequence_length"] == 2048
    assert kwargs["tensor_parallel_size"] == 24 and kwargs["instance_type"] == "inf2"
    import torch

    assert config.dtype == torch.float16  # what optimum-neuron>=0.4.2 reads (transformers 4.57: config.dtype)
    assert export_call == ("export", str(tiny_llama), {"neuron": True}, False)


def test_releases_that_cannot_save_are_refused_before_any_work():
    neuron_exporter.check_optimum_neuron_version("0.4.5")
    neuron_exporter.check_optimum_neuron_version("0.4.2")
    for bad in ("0.4.1", "0.4.0", "0.3.0", "0.5.0"):
        with pytest.raises(MissingDependencyError, match=f"optimum-neuron>=0.4.2,<0.5, this machine has {bad}"):
            neuron_exporter.check_optimum_neuron_version(bad)


@pytest.mark.parametrize("heads, kv_heads, tp, padded", [
    (32, 32, 2, (32, 32)),    # Llama-2-7B on one inf2 chip
    (32, 32, 24, (48, 48)),   # Llama-2-7B on inf2.48xlarge: MHA heads padded to 48
    (40, 40, 24, (48, 48)),   # Llama-2-13B
    (32, 8, 2, (32, 8)),      # Llama-3.1-8B, GQA that divides
    (32, 8, 24, (48, 24)),    # Llama-3.1-8B on 24 cores: KV heads replicated to the cores
    (32, 8, 12, (36, 36)),    # 12 cores are no multiple of 8 KV heads: converted to multi-head attention
])
def test_head_padding_follows_optimum_neurons_rule(heads, kv_heads, tp, padded):
    dims = memory.ModelDims(vocab_size=32000, hidden_size=heads * 128, intermediate_size=11008, num_layers=32,
                            num_heads=heads, num_kv_heads=kv_heads, head_dim=128)
    result = dims.padded_for_neuron(tp)
    assert (result.num_heads, result.num_kv_heads) == padded


def test_memory_estimate_counts_the_padded_kv_cache():
    config = memory.KNOWN_MODELS[0][2]  # Llama-2-7B
    plain = memory.estimate(config, 1, 4096, "bf16")
    padded = memory.estimate(config, 1, 4096, "bf16", neuron_tensor_parallel=24)
    assert plain.kv_cache_bytes == 2 * GIB and padded.kv_cache_bytes == 3 * GIB  # 1.5x, as optimum-neuron allocates
    assert padded.weights_bytes > plain.weights_bytes and "32 -> 48 query heads" in padded.notes[0]
    assert memory.estimate(config, 1, 4096, "bf16", neuron_tensor_parallel=2).notes == []


def test_export_saves_into_the_workdir_and_records_versions(tiny_llama, tmp_path, monkeypatch):
    model_class, calls = _fake_class()
    fake = types.ModuleType("optimum.neuron")
    fake.NeuronModelForCausalLM = model_class
    monkeypatch.setitem(sys.modules, "optimum.neuron", fake)
    recipe = resolve(CONFIGS / "llama2-7b-neuron-latency.yaml", {"neuron.compiler_args": {"optlevel": 2}})
    seen_env = {}
    real_compile = neuron_exporter.compile_model

    def spy(model_class, checkpoint, plan):
        import os

        seen_env["flags"] = os.environ.get("NEURON_CC_FLAGS")
        return real_compile(model_class, checkpoint, plan)

    monkeypatch.setattr(neuron_exporter, "compile_model", spy)
    result = neuron_exporter.NeuronExporter().export(recipe, tiny_llama, tmp_path)
    assert seen_env["flags"] == "--optlevel=2"
    import os

    assert "NEURON_CC_FLAGS" not in os.environ  # restored
    assert (tmp_path / "model.pt").is_file()
    runtime = result.runtime
    assert runtime["api"] == "get_neuron_config+export" and runtime["padding_side"] == "right"
    assert runtime["compiler_args"] == {"num_cores": 24, "auto_cast_type": "fp16"}
    assert runtime["env"] == {"NEURON_CC_FLAGS": "--optlevel=2", "NEURON_PLATFORM_TARGET_OVERRIDE": "trn1"}
    assert set(runtime["versions"]) >= {"optimum-neuron", "neuronx-cc"}


def test_runner_without_a_device_says_so(tmp_path, monkeypatch):
    from llmopt import api, artifact
    from llmopt.artifact import Manifest

    output = tmp_path / "neuron-artifact"
    with artifact.staging(output) as workdir:
        (workdir / "model.pt").write_bytes(b"neff")
        artifact.finalize(workdir, Manifest(target="neuron", recipe={}, source={}, backend_versions={},
                                            shapes={"batch_size": 1, "sequence_length": 2048}, precision="fp16",
                                            quantization={}))
    monkeypatch.setattr("llmopt.runners.neuron.neuron_device_present", lambda: False)
    with pytest.raises(MissingDependencyError, match="needs a Neuron device"):
        api.open_runner(output)


def test_recipe_error_is_a_usage_error():
    with pytest.raises(RecipeError):
        neuron_exporter.NeuronExporter().check(resolve(CONFIGS / "llama2-7b-neuron-budget.yaml",
                                                       {"quantization.weight_format": "fp8"}))


# ------------------------------------------------------------------------------ on Neuron hardware


@pytest.mark.neuron
@requires_neuron
def test_export_and_generate_on_neuron(tmp_path):
    from llmopt import api

    smollm2 = ROOT / "models" / "SmolLM2-135M-Instruct"
    if not (smollm2 / "config.json").is_file():
        pytest.skip("the SmolLM2 checkpoint is missing: run `make model`")
    recipe = resolve(overrides={"model.id": str(smollm2), "target": "neuron", "shapes.batch_size": 1,
                                "shapes.sequence_length": 256, "precision.dtype": "bf16", "neuron.num_cores": 2})
    report = api.export(recipe, tmp_path / "smollm2-neuron")
    assert report.manifest.runtime["versions"]["optimum-neuron"]
    results = api.run(tmp_path / "smollm2-neuron", ["What is the capital of France?"], max_new_tokens=16, temperature=0.0)
    assert results[0].token_ids and results[0].ttft_ms > 0
