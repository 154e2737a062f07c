"""Post-training quantization with NVIDIA ModelOpt into a checkpoint TensorRT-LLM builds from.

``quantize_checkpoint(checkpoint, out_dir, "fp8" | "w4a16_awq" | "w8a8_sq", calib_texts)`` loads a
Hugging Face checkpoint, calibrates it with ``modelopt.torch.quantization.quantize(model, CFG,
forward_loop)`` (``FP8_DEFAULT_CFG``, ``INT4_AWQ_CFG``, ``INT8_SMOOTHQUANT_CFG``, plus
``FP8_KV_CFG`` for an FP8 KV cache) and writes it with ``modelopt.torch.export.export_hf_checkpoint``:
safetensors with the quantized weights and their scales, ``config.json`` with a
``quantization_config`` and ``hf_quant_config.json`` (``quant_algo``, ``kv_cache_quant_algo``), which
``tensorrt_llm.LLM(model=out_dir)`` reads as a pre-quantized checkpoint.

Calibration runs on CUDA when there is a GPU and on the CPU otherwise (fake quantization in fp32:
slow for large models, fine for small ones and for tests). Known limits of ModelOpt's HF export,
checked before any work: an INT8 KV cache cannot be exported (only FP8), and the int4 block size
must divide the input width of every decoder matmul.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from llmopt import validation
from llmopt.errors import RecipeError, UsageError

# llmopt name -> (ModelOpt config, TensorRT-LLM QuantAlgo written in hf_quant_config.json)
ALGORITHMS: dict[str, tuple[str | None, str | None]] = {
    "fp8": ("FP8_DEFAULT_CFG", "FP8"),
    "w4a16_awq": ("INT4_AWQ_CFG", "W4A16_AWQ"),
    "w8a8_sq": ("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL"),
    "none": (None, None),  # weights untouched: only the KV cache is calibrated
}
KV_CACHE_CONFIGS = {"fp8": ("FP8_KV_CFG", "FP8")}
INT4_BLOCK_SIZES = (128, 64)  # what TensorRT-LLM's W4A16_AWQ kernels take, preferred first
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_options(algo: str, kv_cache: str | None) -> None:
    if algo not in ALGORITHMS:
        raise UsageError(f"unknown quantization algorithm '{algo}'; accepted: {', '.join(ALGORITHMS)}")
    if kv_cache not in (None, "auto", "fp16", "bf16", *KV_CACHE_CONFIGS):
        raise RecipeError(
            f"recipe field 'tensorrt.kv_cache_dtype': {kv_cache} KV cache cannot be produced: ModelOpt's checkpoint "
            f"export writes only an FP8 KV cache ({', '.join(KV_CACHE_CONFIGS)}); use fp8 (Ada/Hopper) or auto"
        )
    if algo == "none" and kv_cache not in KV_CACHE_CONFIGS:
        raise UsageError("nothing to quantize: give a weight algorithm or an fp8 KV cache")


def pick_block_size(in_features: Iterable[int], requested: int | None = None) -> int:
    """The int4 group size: the requested one if it divides every matmul input, else 128, else 64."""
    widths = sorted(set(in_features))
    if requested is not None and requested > 0:
        if requested not in INT4_BLOCK_SIZES:
            raise RecipeError(
                f"recipe field 'quantization.group_size': {requested} is not an int4 group size TensorRT-LLM "
                f"takes; accepted: {', '.join(map(str, INT4_BLOCK_SIZES))}"
            )
        bad = [width for width in widths if width % requested]
        if bad:
            raise RecipeError(
                f"recipe field 'quantization.group_size': {requested} does not divide the matmul input width "
                f"{bad[0]}; use {' or '.join(str(size) for size in INT4_BLOCK_SIZES if all(w % size == 0 for w in widths)) or 'another model'}"
            )
        return requested
    for size in INT4_BLOCK_SIZES:
        if all(width % size == 0 for width in widths):
            return size
    raise RecipeError(
        f"int4 AWQ needs a group size dividing every matmul input width ({', '.join(map(str, widths))}); "
        f"none of {', '.join(map(str, INT4_BLOCK_SIZES))} does"
    )


def _entries(quant_cfg) -> Iterable[tuple[str, dict]]:
    """(pattern, cfg) pairs of a ModelOpt quant_cfg in either format: dict (<=0.3x) or list (newer)."""
    if isinstance(quant_cfg, dict):
        for pattern, cfg in quant_cfg.items():
            if isinstance(cfg, dict):
                yield pattern, cfg
    else:
        for entry in quant_cfg:
            if isinstance(entry, dict) and isinstance(entry.get("cfg"), dict):
                yield entry.get("quantizer_name", ""), entry["cfg"]


def modelopt_config(algo: str, kv_cache: str | None = None, block_size: int | None = None, mtq=None) -> dict[str, Any]:
    """The ModelOpt quantize config for an llmopt algorithm, a copy safe to change."""
    check_options(algo, kv_cache)
    if mtq is None:
        import modelopt.torch.quantization as mtq
    name, _ = ALGORITHMS[algo]
    if name is None:
        base = copy.deepcopy(mtq.FP8_DEFAULT_CFG)  # its layout, every quantizer off but the KV cache
        quant_cfg = base["quant_cfg"]
        config = {"quant_cfg": {"*": {"enable": False}} if isinstance(quant_cfg, dict)
                  else [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    else:
        config = copy.deepcopy(getattr(mtq, name))
    if algo == "w4a16_awq" and block_size:
        for pattern, cfg in _entries(config["quant_cfg"]):
            if pattern == "*weight_quantizer" and isinstance(cfg.get("block_sizes"), dict):
                cfg["block_sizes"][-1] = block_size
    if kv_cache in KV_CACHE_CONFIGS:
        kv_cfg = copy.deepcopy(getattr(mtq, KV_CACHE_CONFIGS[kv_cache][0])["quant_cfg"])
        if isinstance(config["quant_cfg"], dict):
            config["quant_cfg"].update({key: value for key, value in kv_cfg.items() if key != "default"})
        else:
            config["quant_cfg"].extend(
                entry for entry in kv_cfg if entry.get("quantizer_name") not in ("*", "default")
            )
    return config


def calibration_texts(dataset: str | None = None, num_samples: int = 64) -> list[str]:
    """Calibration text: a local .txt (paragraphs) / .jsonl ("text" field) file, or llmopt's shipped text."""
    if dataset is None:
        text = resources.files("llmopt.data").joinpath("validation.txt").read_text(encoding="utf-8")
        samples = [chunk.strip() for chunk in text.split("\n\n") if chunk.strip()]
    else:
        path = Path(dataset).expanduser()
        shipped = resources.files("llmopt.data").joinpath(f"{dataset}.txt")
        if path.suffix == ".jsonl" and path.is_file():
            samples = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    item = json.loads(line)
                    samples.append(item.get("text", "") if isinstance(item, dict) else str(item))
        elif path.is_file():
            samples = [chunk.strip() for chunk in path.read_text(encoding="utf-8").split("\n\n") if chunk.strip()]
        elif shipped.is_file():
            samples = [chunk.strip() for chunk in shipped.read_text(encoding="utf-8").split("\n\n") if chunk.strip()]
        else:
            raise RecipeError(
                f"recipe field 'quantization.dataset': '{dataset}' is neither a local .txt/.jsonl file nor a shipped set"
            )
    samples = [sample for sample in samples if sample]
    if not samples:
        raise RecipeError(f"recipe field 'quantization.dataset': '{dataset}' holds no text")
    return (samples * (num_samples // len(samples) + 1))[:num_samples]


def forward_loop_for(tokenizer, texts: list[str], max_length: int, device) -> Callable:
    """ModelOpt's ``forward_loop``: one forward pass per calibration text."""
    import torch

    encoded = [tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"] for text in texts]

    def forward_loop(model) -> None:
        with torch.no_grad():
            for input_ids in encoded:
                model(input_ids.to(device))

    return forward_loop


def quantize_model(model, forward_loop: Callable, algo: str, kv_cache: str | None = None, block_size: int | None = None):
    """Calibrate ``model`` in place with ModelOpt; returns the fake-quantized model."""
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, modelopt_config(algo, kv_cache, block_size, mtq=mtq), forward_loop)


@dataclass
class QuantizeReport:
    out_dir: str
    algo: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    block_size: int | None
    samples: int
    device: str
    dtype: str
    modelopt_version: str | None
    # The fake-quantized model against the unquantized one, teacher-forced on llmopt's validation text.
    fake_quant: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def matmul_in_features(model) -> set[int]:
    import torch

    widths = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            widths.add(module.in_features)
    return widths


def quantize_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    algo: str,
    calib_texts: list[str] | None = None,
    *,
    kv_cache: str | None = None,
    block_size: int | None = None,
    dtype: str = "fp16",
    device: str = "auto",
    max_samples: int = 64,
    max_length: int = 512,
) -> QuantizeReport:
    """Quantize a HF checkpoint with ModelOpt and export it (weights, scales, quant configs) to ``out_dir``."""
    check_options(algo, kv_cache)
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmopt._deps import dtype_keyword, version_of

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp32 on the CPU: half-precision matmuls there are slow or missing; the export casts to ``dtype``.
    load_dtype = torch.float32 if device == "cpu" else getattr(torch, TORCH_DTYPES[dtype])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **{dtype_keyword(): load_dtype}).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if algo == "w4a16_awq":
        block_size = pick_block_size(matmul_in_features(model), block_size)
    else:
        block_size = None
    texts = (calib_texts or calibration_texts(None, max_samples))[:max_samples]
    probe = validation.validation_ids(tokenizer, max_length)
    reference = _logits(model, probe, device)
    model = quantize_model(model, forward_loop_for(tokenizer, texts, max_length, device), algo, kv_cache, block_size)
    fake_quant = validation.compare(reference, _logits(model, probe, device), probe)
    target_dtype = getattr(torch, TORCH_DTYPES[dtype])
    model = model.to(target_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False):
        export_hf_checkpoint(model, dtype=target_dtype, export_dir=out_dir)
    tokenizer.save_pretrained(out_dir)
    quant_file = out_dir / "hf_quant_config.json"
    if not quant_file.is_file():
        raise UsageError(f"ModelOpt wrote no hf_quant_config.json into {out_dir}; the export did not quantize")
    declared = json.loads(quant_file.read_text(encoding="utf-8")).get("quantization", {})
    return QuantizeReport(
        out_dir=str(out_dir), algo=algo, quant_algo=declared.get("quant_algo"),
        kv_cache_quant_algo=declared.get("kv_cache_quant_algo"), block_size=block_size, samples=len(texts),
        device=device, dtype=dtype, modelopt_version=version_of("nvidia-modelopt"), fake_quant=fake_quant,
    )


def _logits(model, token_ids: list[int], device):
    import torch

    with torch.no_grad():
        return model(torch.tensor([token_ids], device=device)).logits[0].float().cpu().numpy()
