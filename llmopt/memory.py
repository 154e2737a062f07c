"""Pre-flight memory estimate: will the weights and the KV cache fit on the device?

Works from a model's ``config.json`` alone (no torch, no download). The model's dimensions come from,
in order: the recipe's local checkpoint directory, the Hugging Face cache (a snapshot already on
disk, read without network), a small built-in table of the models the shipped recipes name, or
nothing (the estimate then says ``unknown`` and no fit check is made).

    weights  = quantized decoder matmuls at the weight format + embeddings, lm_head, norms at the dtype
    KV cache = batch x sequence_length x layers x 2 (K and V) x kv_heads x head_dim x KV bytes

Llama-2-7B (6.74e9 parameters) in fp16: 13.48 GB of weights; its KV cache for batch 4 x 2048
tokens in fp16 is 4 x 2048 x 32 x 2 x 32 x 128 x 2 bytes = 4.29 GB (4 GiB). Activations and runtime
buffers are not counted: ``USABLE_FRACTION`` of the device memory is what the two may take.

Usage: ``python -m llmopt.memory MODEL_OR_CONFIG --batch-size 4 --sequence-length 2048 --dtype fp16``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llmopt.errors import RecipeError

DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "u8": 1.0}
# Share of device memory weights + KV cache may use; the rest is left to activations, the runtime
# and (on GPUs) the CUDA context.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class ModelDims:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelDims":
        """Dimensions of a decoder-only transformer from its ``config.json`` (nested text_config too)."""
        if "text_config" in config and "hidden_size" not in config:
            config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", False)}
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            vocab = int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json lacks a decoder dimension ({exc})") from exc
        head_dim = config.get("head_dim") or hidden // heads
        model_type = str(config.get("model_type", ""))
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(config.get("intermediate_size") or 4 * hidden),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            gated_mlp=model_type not in ("gpt2", "gpt_neox", "phi"),
        )

    @property
    def linear_parameters(self) -> int:
        """Parameters of the decoder layers' matmuls (what weight quantization applies to)."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def other_parameters(self) -> int:
        """Embeddings, lm_head, norms and biases: kept at the compute dtype by every target."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = self.num_layers * 2 * self.hidden_size + self.hidden_size
        bias = self.num_layers * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return embeddings + norms + bias

    @property
    def parameters(self) -> int:
        return self.linear_parameters + self.other_parameters

    def padded_for_neuron(self, tensor_parallel_size: int) -> "ModelDims":
        """The heads optimum-neuron allocates when sharding over ``tensor_parallel_size`` NeuronCores.

        optimum-neuron's GQA sharding (backend/modules/attention/gqa.py, 0.4.0-0.4.5) pads the query
        heads to a multiple of the cores; the KV heads follow the query heads for multi-head attention,
        are replicated up to the core count when it is a multiple of them, and are otherwise converted
        to multi-head attention. The KV cache and the q/k/v/o weights are allocated at the padded counts:
        Llama-2-7B (32 heads) on 24 cores gets 48 query and 48 KV heads, 1.5 times its KV cache.
        """
        tp = tensor_parallel_size
        heads = -(-self.num_heads // tp) * tp
        if self.num_kv_heads == self.num_heads:
            kv_heads = heads
        elif self.num_kv_heads < tp or self.num_kv_heads % tp:
            kv_heads = tp if tp % self.num_kv_heads == 0 else heads
        else:
            kv_heads = self.num_kv_heads
        return replace(self, num_heads=heads, num_kv_heads=kv_heads)

    def matmul_in_features(self) -> set[int]:
        """Input widths of the decoder matmuls: an int4 group size must divide each of them."""
        return {self.hidden_size, self.num_heads * self.head_dim, self.intermediate_size}


def _dims(vocab, hidden, inter, layers, heads, kv, tied=False) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "tie_word_embeddings": tied}


# The models the shipped recipes name, keyed by a pattern on the lower-cased repository name (the
# part after the organization), so meta-llama/, NousResearch/ and -chat variants all match.
KNOWN_MODELS: list[tuple[str, str, dict[str, Any]]] = [
    (r"llama-2-7b(-chat)?(-hf)?", "Llama-2-7B", _dims(32000, 4096, 11008, 32, 32, 32)),
    (r"llama-2-13b(-chat)?(-hf)?", "Llama-2-13B", _dims(32000, 5120, 13824, 40, 40, 40)),
    (r"llama-2-70b(-chat)?(-hf)?", "Llama-2-70B", _dims(32000, 8192, 28672, 80, 64, 8)),
    (r"(meta-)?llama-3\.1-8b(-instruct)?", "Llama-3.1-8B", _dims(128256, 4096, 14336, 32, 32, 8)),
    (r"mistral-7b(-instruct)?-v0\.\d", "Mistral-7B", _dims(32000, 4096, 14336, 32, 32, 8)),
    (r"smollm2-135m(-instruct)?", "SmolLM2-135M", _dims(49152, 576, 1536, 30, 9, 3, tied=True)),
    (r"smollm2-360m(-instruct)?", "SmolLM2-360M", _dims(49152, 960, 2560, 32, 15, 5, tied=True)),
    (r"smollm2-1\.7b(-instruct)?", "SmolLM2-1.7B", _dims(49152, 2048, 8192, 24, 32, 32, tied=True)),
]


def known_model(model_id: str) -> tuple[str, dict[str, Any]] | None:
    name = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
    for pattern, label, config in KNOWN_MODELS:
        if re.fullmatch(pattern, name):
            return label, config
    return None


def find_config(model_id: str, revision: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """The model's config.json without any download, and where it came from (or why not)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if config_path.is_file():
            return json.loads(config_path.read_text(encoding="utf-8")), f"config.json in {path}"
        return None, f"{path} has no config.json"
    if path.suffix.lower() == ".gguf":
        return None, "a .gguf file (its dimensions are read only when it is converted)"
    if path.is_file() and path.name == "config.json":
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    cached = _hub_cached_config(model_id, revision)
    if cached is not None:
        return json.loads(Path(cached).read_text(encoding="utf-8")), f"config.json in the Hugging Face cache ({cached})"
    known = known_model(model_id)
    if known is not None:
        return known[1], f"llmopt's table of known models ({known[0]})"
    return None, f"'{model_id}' is not a local checkpoint, not in the Hugging Face cache and not in llmopt's table"


def _hub_cached_config(model_id: str, revision: str | None) -> str | None:
    if model_id.count("/") != 1 or model_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except Exception:  # an invalid repo id for the cache layout: simply not cached
        return None
    return found if isinstance(found, str) else None


# ------------------------------------------------------------------------------------ estimate


def weight_bytes_per_parameter(weight_format: str, dtype: str, group_size: int | None = None) -> float:
    """Bytes per quantized matmul parameter, scales included (fp16 scale per int4 group)."""
    if weight_format in ("none", None):
        return DTYPE_BYTES[dtype]
    if weight_format in ("int8", "fp8"):
        return 1.0
    if weight_format == "int4":
        group = group_size if group_size and group_size > 0 else 128
        return 0.5 + 2.0 / group
    raise ValueError(f"unknown weight format '{weight_format}'")


def _gb(value: float) -> float:
    return round(value / 1e9, 2)


@dataclass
class MemoryEstimate:
    status: str  # "ok", "unknown"
    source: str
    parameters: int | None = None
    weights_bytes: int | None = None
    weights_precision: str | None = None
    kv_cache_bytes: int | None = None
    kv_cache_dtype: str | None = None
    kv_cache_formula: str | None = None
    total_bytes: int | None = None
    device: str | None = None
    capacity_bytes: int | None = None
    usable_bytes: int | None = None
    fits: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("weights_bytes", "kv_cache_bytes", "total_bytes", "capacity_bytes", "usable_bytes"):
            if data[key] is not None:
                data[key.replace("_bytes", "_gb")] = _gb(data[key])
        return data

    def with_device(self, device: str, capacity_bytes: int) -> "MemoryEstimate":
        self.device = device
        self.capacity_bytes = int(capacity_bytes)
        self.usable_bytes = int(capacity_bytes * USABLE_FRACTION)
        if self.total_bytes is not None:
            self.fits = self.total_bytes <= self.usable_bytes
        return self

    def check_fits(self, hint: str) -> None:
        """RecipeError with both numbers when the estimate is known and over the usable memory."""
        if self.fits is False:
            raise RecipeError(
                f"the model does not fit: it needs {_gb(self.total_bytes)} GB (weights {_gb(self.weights_bytes)} GB "
                f"{self.weights_precision} + KV cache {_gb(self.kv_cache_bytes)} GB) but {self.device} has "
                f"{_gb(self.usable_bytes)} GB usable ({int(USABLE_FRACTION * 100)}% of {_gb(self.capacity_bytes)} GB)",
                hint=hint,
            )


def estimate(
    config: dict[str, Any] | None,
    batch_size: int,
    sequence_length: int,
    dtype: str,
    weight_format: str = "none",
    group_size: int | None = None,
    kv_cache_dtype: str | None = None,
    source: str = "config.json",
    neuron_tensor_parallel: int | None = None,
) -> MemoryEstimate:
    """Weights + KV cache bytes for a model config at a precision; ``unknown`` without a config."""
    if config is None:
        return MemoryEstimate(status="unknown", source=source)
    try:
        dims = ModelDims.from_config(config)
    except ValueError as exc:
        return MemoryEstimate(status="unknown", source=f"{source}: {exc}")
    notes = []
    if neuron_tensor_parallel:
        padded = dims.padded_for_neuron(neuron_tensor_parallel)
        if (padded.num_heads, padded.num_kv_heads) != (dims.num_heads, dims.num_kv_heads):
            notes.append(
                f"optimum-neuron pads the attention heads for {neuron_tensor_parallel} NeuronCores: "
                f"{dims.num_heads} -> {padded.num_heads} query heads, {dims.num_kv_heads} -> {padded.num_kv_heads} "
                "KV heads (KV cache and attention weights counted padded)"
            )
        dims = padded
    kv_dtype = kv_cache_dtype if kv_cache_dtype not in (None, "auto") else dtype
    per_param = weight_bytes_per_parameter(weight_format, dtype, group_size)
    weights = dims.linear_parameters * per_param + dims.other_parameters * DTYPE_BYTES[dtype]
    kv_bytes = DTYPE_BYTES[kv_dtype]
    kv = batch_size * sequence_length * dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim * kv_bytes
    if weight_format in ("none", None):
        precision = dtype
    elif weight_format == "int4":
        precision = f"int4 (group {group_size if group_size and group_size > 0 else 128}) + {dtype}"
    else:
        precision = f"{weight_format} + {dtype}"
    return MemoryEstimate(
        status="ok",
        source=source,
        parameters=dims.parameters,
        weights_bytes=int(weights),
        weights_precision=precision,
        kv_cache_bytes=int(kv),
        kv_cache_dtype=kv_dtype,
        kv_cache_formula=(
            f"batch {batch_size} x seq {sequence_length} x layers {dims.num_layers} x 2 x kv_heads "
            f"{dims.num_kv_heads} x head_dim {dims.head_dim} x {kv_bytes:g} bytes"
        ),
        total_bytes=int(weights + kv),
        notes=notes,
    )


def estimate_for_recipe(recipe, kv_cache_dtype: str | None = None,
                        neuron_tensor_parallel: int | None = None) -> MemoryEstimate:
    """The estimate for a recipe's model, shapes and precision (device added by the caller)."""
    config, source = find_config(recipe.model.id, recipe.model.revision)
    quantization = recipe.quantization
    kv = kv_cache_dtype if kv_cache_dtype is not None else quantization.kv_cache
    return estimate(
        config,
        batch_size=recipe.shapes.batch_size,
        sequence_length=recipe.shapes.sequence_length,
        dtype=recipe.precision.dtype,
        weight_format=quantization.weight_format,
        group_size=quantization.group_size,
        kv_cache_dtype=kv if kv in DTYPE_BYTES else None,
        source=source,
        neuron_tensor_parallel=neuron_tensor_parallel,
    )


def model_dims_for(model_id: str, revision: str | None = None) -> ModelDims | None:
    config, _ = find_config(model_id, revision)
    if config is None:
        return None
    try:
        return ModelDims.from_config(config)
    except ValueError:
        return None


def release() -> None:
    """Return freed memory to the system after a large model goes out of scope.

    Backends leave their weights in reference cycles (the onnxruntime-genai builder's IR holds the
    torch tensors: 1.4 GB of a 1.5 GB fp32 model still resident after ``create_model`` returns,
    until a collection), and glibc keeps freed heap pages unless trimmed; both would otherwise
    stay under the next model loaded (the parity check's).
    """
    import gc

    gc.collect()
    trim()


def trim() -> None:
    """glibc's ``malloc_trim``: give the pages of freed heap memory back to the system.

    glibc raises its mmap threshold to the size of the largest block freed, so tensors allocated
    and freed in turn (a streamed model's layers) come from the heap, which keeps their pages: the
    parity reference grew by 0.4 GB over 24 streamed layers without a trim after each.
    """
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc and "libc.so" in libc:  # other C libraries have no such call
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc).malloc_trim(0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmopt.memory", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="checkpoint directory, config.json, or a Hub id (cache or table only)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp16")
    parser.add_argument("--weight-format", choices=("none", "int8", "int4", "fp8"), default="none")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--kv-cache-dtype", choices=tuple(DTYPE_BYTES), default=None)
    args = parser.parse_args(argv)
    config, source = find_config(args.model)
    result = estimate(config, args.batch_size, args.sequence_length, args.dtype, args.weight_format,
                      args.group_size, args.kv_cache_dtype, source)
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
