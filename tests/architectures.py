"""Tiny random-init checkpoints, one per supported architecture, sharing tiny_llama's tokenizer.

Each config is as small as the architecture allows (2 layers, hidden 64, 4 query and 2 key/value
heads of 16) and keeps the features that make the architecture what it is: Gemma's soft-capping,
Granite's multipliers, Phi's partial rotary, OLMo's weightless LayerNorm, Nemotron's squared ReLU.
Weights are drawn wider than the default init so that greedy choices are not near-ties.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)

# model_type -> what its config needs beyond COMMON.
SPECIFIC: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    # Rotary halves of 8 and more (onnxruntime's GroupQueryAttention), heads as optimum-intel's dummy cache has them.
    "phi": {"hidden_size": 128, "num_key_value_heads": 4, "partial_rotary_factor": 0.5},
    "phi3": {"original_max_position_embeddings": 512},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.125,
                "logits_scaling": 4.0},
    "olmo": {},
    "nemotron": {"hidden_size": 128, "head_dim": 32, "partial_rotary_factor": 0.5},
}


def build(model_type: str, tiny_llama: Path, directory: Path, seed: int = 0, **overrides) -> Path:
    """A random ``model_type`` checkpoint in ``directory`` with tiny_llama's tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    for file in tiny_llama.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy2(file, directory / file.name)
    base = json.loads((tiny_llama / "config.json").read_text())
    ids = {key: base[key] for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(model_type, **{**COMMON, **SPECIFIC[model_type], **ids, **overrides})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(directory)
    return directory
