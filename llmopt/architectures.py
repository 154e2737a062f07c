"""The decoder architectures llmopt exports: one registry, read by the checks, ``doctor`` and the README.

An architecture is listed when both CPU exporters build it in the pinned versions (the
onnxruntime-genai model builder keys on ``hf_class``; optimum-intel on ``model_type``) and a tiny
random-init checkpoint of it exports to both with exact parity in the test suite
(``tests/test_architectures.py``). ``gguf`` is the GGUF ``general.architecture`` that transformers'
GGUF loader converts into it, where it has one. Anything else is refused in one line before any
conversion or tracing.

Both exporters also take smollm3, but the builder's graph for its no-RoPE layers does not load
(onnxruntime: "Node input 'position_ids' is not a graph input"), so it is not listed. The builder's
OLMo and optimum-intel's Gemma 2 are mended by the exporters (see ``mend_builder_graph`` and
``traced_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    hf_class: str  # the transformers class the checkpoint loads as
    family: str  # what users call it
    gguf: str | None = None  # GGUF general.architecture converted into it


ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch for arch in (
    Architecture("llama", "LlamaForCausalLM", "Llama 2/3, SmolLM2, TinyLlama", gguf="llama"),
    Architecture("mistral", "MistralForCausalLM", "Mistral", gguf="mistral"),
    Architecture("qwen2", "Qwen2ForCausalLM", "Qwen2, Qwen2.5", gguf="qwen2"),
    Architecture("qwen3", "Qwen3ForCausalLM", "Qwen3", gguf="qwen3"),
    Architecture("phi", "PhiForCausalLM", "Phi-1.5, Phi-2"),
    Architecture("phi3", "Phi3ForCausalLM", "Phi-3, Phi-3.5, Phi-4 mini", gguf="phi3"),
    Architecture("gemma", "GemmaForCausalLM", "Gemma"),
    Architecture("gemma2", "Gemma2ForCausalLM", "Gemma 2", gguf="gemma2"),
    Architecture("gemma3_text", "Gemma3ForCausalLM", "Gemma 3 (text: 270M, 1B)", gguf="gemma3"),
    Architecture("granite", "GraniteForCausalLM", "Granite 3"),
    Architecture("olmo", "OlmoForCausalLM", "OLMo"),
    Architecture("nemotron", "NemotronForCausalLM", "Nemotron, Minitron", gguf="nemotron"),
)}

GGUF_ARCHITECTURES: dict[str, str] = {arch.gguf: arch.model_type for arch in ARCHITECTURES.values() if arch.gguf}


def soft_capped(config: dict) -> bool:
    """Whether a config.json's attention scores are soft-capped (Gemma 2). transformers' sdpa attention
    drops the cap silently, so such a model is computed, and traced, with eager attention."""
    return bool(config.get("attn_logit_softcapping"))


def markdown_table() -> str:
    """The README's table of supported architectures."""
    rows = ["| model_type | transformers class | models | from GGUF |", "|---|---|---|---|"]
    rows += [f"| `{a.model_type}` | `{a.hf_class}` | {a.family} | {f'`{a.gguf}`' if a.gguf else '-'} |"
             for a in ARCHITECTURES.values()]
    return "\n".join(rows)
