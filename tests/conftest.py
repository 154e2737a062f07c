"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, built once per session.

Nothing here downloads anything. The real SmolLM2 checkpoint (``make model``) is used only by
tests marked ``slow``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Compilers turn programs into machine code; runtimes execute them quickly.",
    "Héllo wörld, naïve café — numbers 0123456789 and symbols !?.,;:()[]{}",
    "def generate(tokens):\n    return model(tokens)\n",
]


def _build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads) saved as a normal checkpoint directory."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _build_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip("the SmolLM2 checkpoint is missing: run `make model`")
    return SMOLLM2


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """No test may reach the Hugging Face Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path_factory):
    """CLI exports use the compile cache: keep it out of the home directory, shared within the session."""
    import os

    if "LLMOPT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "llmopt-cache"))


def write_recipe(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


PROMPTS = [  # different lengths, so batches are padded
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Compilers turn programs into machine code; runtimes execute them quickly.",
    "def generate(tokens):\n    return model(tokens)",
]


def pytorch_results(checkpoint: Path, manifest, prompts: list[str], sampling, chat: bool = True):
    """PyTorch on the same prompts, batched and length-limited like the artifact."""
    from llmopt import generation
    from llmopt.runners.pytorch import PyTorchRunner

    runner = PyTorchRunner.from_checkpoint(checkpoint, batch_size=manifest.batch_size,
                                           sequence_length=manifest.sequence_length, threads=1)
    try:
        return generation.generate(runner, prompts, sampling, chat=chat)
    finally:
        runner.close()


def build_untied_llama(tiny_llama: Path, directory: Path, seed: int) -> Path:
    """tiny_llama's tokenizer on a random Llama with an untied head and a wider init.

    tiny_llama's greedy text just repeats a token; this model's depends on the whole prompt, so
    token-for-token comparisons with PyTorch mean something.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for file in tiny_llama.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy2(file, directory / file.name)
    base = json.loads((tiny_llama / "config.json").read_text())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def untied_llama(tiny_llama, tmp_path_factory) -> Path:
    return build_untied_llama(tiny_llama, tmp_path_factory.mktemp("untied-llama"), seed=1)


@pytest.fixture(scope="session")
def build_artifact(tmp_path_factory):
    """``build_artifact(model, **recipe_fields)`` -> path: each distinct export built once per session.

    Validated against PyTorch as every export is, without the compile cache. The contract test and the
    per-target tests ask for the same artifacts, so each is built only once.
    """
    built: dict[tuple, Path] = {}

    def build(model: Path, **fields) -> Path:
        from llmopt import api
        from llmopt.recipe import resolve

        key = (str(model), tuple(sorted((name, repr(value)) for name, value in fields.items())))
        if key not in built:
            output = tmp_path_factory.mktemp("artifact") / "artifact"
            api.export(resolve(None, {"model.id": str(model), **fields}), output)
            built[key] = output
        return built[key]

    return build


@pytest.fixture(scope="session")
def q4_1_llama(untied_llama, tmp_path_factory) -> Path:
    """untied_llama with every decoder weight moved onto a GGUF Q4_1 grid: w = d * q + m per block of 32."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("q4-1-llama")
    for file in untied_llama.iterdir():
        shutil.copy2(file, directory / file.name)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layers" in name and parameter.ndim == 2:
                out, features = parameter.shape
                blocks = parameter.numpy().reshape(out, features // 32, 32)
                d = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)).astype(np.float16).astype(np.float32) / 15
                m = blocks.min(-1, keepdims=True) + rng.uniform(-0.1, 0.1, size=d.shape).astype(np.float32) * d
                q = np.clip(np.rint((blocks - m) / d), 0, 15)
                parameter.copy_(torch.from_numpy((q * d + m).reshape(out, features)))
    model.save_pretrained(directory)
    return directory
