"""LoRA adapters made with PEFT, merged before export: the artifact follows the merged model, the
manifest and the cache key record the adapter, and an adapter for another base is refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmopt import adapters, api, cache
from llmopt.errors import UsageError
from llmopt.recipe import resolve
from tests._hardening import assert_one_line_error, llmopt_subprocess

peft = pytest.importorskip("peft", reason="pip install 'llmopt[adapters]'")

TOKENS = [[5, 17, 42, 99, 7, 64, 120, 33, 250, 12, 80, 3]]


def make_lora(base: Path, directory: Path, targets=("q_proj", "v_proj", "down_proj"), scale: float = 4.0, seed: int = 0) -> Path:
    """A LoRA adapter with weights large enough that merged and unmerged outputs differ."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    lora.save_pretrained(directory)
    return directory


def logits(checkpoint: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits[0].numpy()


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory) -> Path:
    return make_lora(tiny_llama, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def other_base_lora(tmp_path_factory, tiny_llama) -> Path:
    """An adapter trained on a Llama of another width (hidden 32): the same module names, other shapes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path_factory.mktemp("narrow-llama")
    config = json.loads((tiny_llama / "config.json").read_text())
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=config["vocab_size"], hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base)
    return make_lora(base, tmp_path_factory.mktemp("lora-narrow") / "adapter")


def test_merge_follows_peft(tiny_llama, lora):
    """The merged checkpoint is PEFT's merge_and_unload, and differs from the base (the test means something)."""
    merged = adapters.merge(tiny_llama, lora, {"base": "x"}, adapters.hashes(lora))
    assert (merged / adapters.MERGED_MARKER).is_file() and (merged / "tokenizer.json").is_file()
    base, after = logits(tiny_llama), logits(merged)
    assert np.abs(base - after).max() > 1.0
    assert (base.argmax(-1) != after.argmax(-1)).any()
    assert adapters.merge(tiny_llama, lora, {"base": "x"}, adapters.hashes(lora)) == merged  # built once


@pytest.mark.onnx
def test_adapter_export_follows_the_merged_model(tiny_llama, lora, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="pip install 'llmopt[onnx]'")
    recipe = resolve(None, {"model.id": str(tiny_llama), "model.adapter": str(lora), "target": "onnx",
                            "shapes.sequence_length": 64})
    report = api.export(recipe, tmp_path / "art", cache_dir=tmp_path / "cache")
    manifest = report.manifest
    assert manifest.source["adapter"]["files"] == adapters.hashes(lora)
    assert manifest.source["base_checkpoint"] == str(tiny_llama)
    merged = Path(manifest.source["checkpoint"])
    assert manifest.validation["passed"]  # the parity gate ran against the merged model
    runner = api.open_runner(tmp_path / "art")
    try:
        got = np.asarray(runner.logits(TOKENS[0]))
    finally:
        runner.close()
    got = got.reshape(-1, got.shape[-1])[-len(TOKENS[0]):]
    merged_logits, base_logits = logits(merged), logits(tiny_llama)
    assert np.abs(got - merged_logits).max() < 1e-2
    assert np.abs(got - base_logits).max() > 1.0  # not the base model
    assert (got.argmax(-1) == merged_logits.argmax(-1)).all()
    again = api.export(recipe, tmp_path / "again", cache_dir=tmp_path / "cache")
    assert again.cached and again.manifest.source["adapter"]["files"] == adapters.hashes(lora)


def test_cache_key_records_the_adapter(tiny_llama, lora, tmp_path):
    store = cache.ArtifactCache(tmp_path)
    recipe = resolve(None, {"model.id": str(tiny_llama), "target": "onnx"})
    with_adapter = resolve(None, {"model.id": str(tiny_llama), "model.adapter": str(lora), "target": "onnx"})
    plain = store.key(recipe, tiny_llama, (), True)
    assert store.key(with_adapter, tiny_llama, (), True) == plain  # the key holds the adapter's content, not its path
    keyed = store.key(with_adapter, tiny_llama, (), True, adapter=adapters.hashes(lora))
    other = store.key(with_adapter, tiny_llama, (), True, adapter={**adapters.hashes(lora), "adapter_model.safetensors": "0" * 64})
    assert len({plain, keyed, other}) == 3


def test_adapter_for_another_base_refused_before_any_work(tiny_llama, other_base_lora, lora, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match=r"has in_features \d+ in the adapter but \d+ in the base model"):
        adapters.check(other_base_lora, tiny_llama)
    renamed = tmp_path / "gpt2-style"
    shutil.copytree(lora, renamed)
    config = json.loads((renamed / adapters.CONFIG_NAME).read_text())
    (renamed / adapters.CONFIG_NAME).write_text(json.dumps({**config, "target_modules": ["c_attn", "q_proj"]}))
    with pytest.raises(UsageError, match="does not have: c_attn"):
        adapters.check(renamed, tiny_llama)
    dora = tmp_path / "not-lora"
    shutil.copytree(lora, dora)
    (dora / adapters.CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(UsageError, match="only LoRA"):
        adapters.check(dora, tiny_llama)
    broken = tmp_path / "broken-config"
    shutil.copytree(lora, broken)
    (broken / adapters.CONFIG_NAME).write_text("{not json")
    with pytest.raises(UsageError, match=f"{adapters.CONFIG_NAME} is not valid JSON"):
        adapters.check(broken, tiny_llama)
    with pytest.raises(UsageError, match="not a PEFT adapter"):
        adapters.resolve(str(tiny_llama))

    result = llmopt_subprocess(["export", "-m", str(tiny_llama), "--adapter", str(other_base_lora), "-t", "onnx",
                                "-o", str(tmp_path / "out")], env={"LLMOPT_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert "adapter" in assert_one_line_error(result.stderr)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "merged").exists()  # nothing merged, nothing built


def test_quantize_of_an_artifact_keeps_its_model(tmp_path, lora):
    """An artifact source fixes the model: an adapter there is refused (export or quantize -m merge it)."""
    with pytest.raises(UsageError, match="model.adapter"):
        api._artifact_source(tmp_path, None, {"model.adapter": str(lora)})


@pytest.mark.slow
@pytest.mark.onnx
def test_smollm2_adapter_export_parity(smollm2, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="pip install 'llmopt[onnx]'")
    adapter = make_lora(smollm2, tmp_path / "smol-lora", targets=("q_proj", "v_proj"), scale=2.0)
    recipe = resolve(None, {"model.id": str(smollm2), "model.adapter": str(adapter), "target": "onnx",
                            "shapes.sequence_length": 128})
    report = api.export(recipe, tmp_path / "art", cache_dir=tmp_path / "cache")
    merged = Path(report.manifest.source["checkpoint"])
    assert report.manifest.validation["passed"], report.manifest.validation
    base_logits, merged_logits = logits(smollm2), logits(merged)
    assert (base_logits.argmax(-1) != merged_logits.argmax(-1)).any()  # the adapter changes what the model says
    print(f"adapter export parity: {report.manifest.validation}")
