"""PEFT LoRA adapters merged into the base weights before export.

``resolve`` finds the adapter (a directory or a Hub id), ``check`` refuses one made for another base
model from the files' headers alone (no weights loaded), and ``merge`` writes the merged checkpoint
once into ``<cache>/merged/<key>/``, keyed by the content of the base and the adapter: that
directory is the checkpoint the exporter and the parity gate both see.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from llmopt import artifact, events, sources
from llmopt._deps import dtype_keyword, require
from llmopt.errors import LlmoptError, UsageError, first_line

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
MERGED_MARKER = "llmopt_merge.json"  # written last: a directory without it is not a finished merge
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.weight$")


def resolve(spec: str, revision: str | None = None) -> Path:
    """A local adapter directory (one with adapter_config.json), or a Hub id downloaded with huggingface_hub."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise UsageError(f"adapter directory '{spec}' has no {CONFIG_NAME}: it is not a PEFT adapter")
        return path.resolve()
    if path.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") != 1:
        raise UsageError(f"adapter '{spec}' is not a PEFT adapter directory (with {CONFIG_NAME}) nor a Hub id (org/name)")
    hub = require("huggingface_hub", extra="adapters")
    try:
        snapshot = Path(hub.snapshot_download(spec, revision=revision, allow_patterns=[CONFIG_NAME, *WEIGHT_NAMES]))
    except Exception as exc:  # huggingface_hub's errors: offline, not found, gated, HTTP
        raise LlmoptError(f"adapter '{spec}': not a local directory, and the Hub gave no adapter "
                          f"({type(exc).__name__}: {first_line(exc)})") from exc
    if not (snapshot / CONFIG_NAME).is_file():
        raise UsageError(f"adapter '{spec}' on the Hub has no {CONFIG_NAME}: it is not a PEFT adapter")
    return snapshot


def adapter_files(adapter_dir: Path) -> list[Path]:
    files = [adapter_dir / name for name in (CONFIG_NAME, *WEIGHT_NAMES) if (adapter_dir / name).is_file()]
    if len(files) < 2:
        raise UsageError(f"adapter '{adapter_dir}' has no weights: expected one of {', '.join(WEIGHT_NAMES)}")
    return files


def hashes(adapter_dir: Path) -> dict[str, str]:
    """sha256 of the adapter's config and weights, by file name: what the manifest and the cache key record."""
    return {path.name: artifact.sha256_file(path) for path in adapter_files(adapter_dir)}


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header, without reading the tensors."""
    return {name: info["shape"] for name, info in sources.safetensors_header(path).items()}


def check(adapter_dir: Path, checkpoint: Path) -> dict:
    """Refuse, before any work, an adapter that is not LoRA or was made for another base model
    (a target module the base lacks, or a shape that differs). Returns the adapter's config."""
    where = f"adapter '{adapter_dir}'"
    try:
        config = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: {CONFIG_NAME} is not valid JSON ({first_line(exc)})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise UsageError(f"{where}: peft_type is {found!r}; only LoRA adapters (peft_type LORA) can be merged")
    weights = adapter_files(adapter_dir)[-1]
    base_files = sorted(checkpoint.glob("*.safetensors"))
    if weights.suffix != ".safetensors" or not base_files:
        return config  # pickled weights: PEFT itself reports a mismatch while merging
    base = {name.removesuffix(".weight"): shape for file in base_files for name, shape in safetensors_shapes(file).items()
            if name.endswith(".weight")}
    targets = config.get("target_modules")
    if isinstance(targets, list):
        missing = [name for name in targets if not any(module == name or module.endswith(f".{name}") for module in base)]
        if missing:
            raise UsageError(f"{where} targets modules the base model {checkpoint.name} does not have: "
                             f"{', '.join(missing)}", hint="use an adapter trained on this base model")
    for name, shape in safetensors_shapes(weights).items():
        match = _LORA_KEY.match(name)
        if match is None:
            continue
        module, part = match.group("module"), match.group("part")
        if module not in base:
            raise UsageError(f"{where}: module '{module}' is not in the base model {checkpoint.name}",
                             hint="use an adapter trained on this base model")
        out_features, in_features = base[module][0], base[module][-1]
        expected = {"A": in_features, "B": out_features}.get(part)
        got = shape[-1] if part == "A" else shape[0]
        if expected is not None and got != expected:
            side = "in" if part == "A" else "out"
            raise UsageError(f"{where}: '{module}' has {side}_features {got} in the adapter but {expected} in the base "
                             f"model {checkpoint.name}", hint="the adapter was trained on another base model")
    return config


def merge(checkpoint: Path, adapter_dir: Path, base_hashes: dict[str, str], adapter_hashes: dict[str, str],
          trust_remote_code: bool = False) -> Path:
    """The base checkpoint with the adapter merged in (PEFT ``merge_and_unload``), built once per content."""
    material = json.dumps({"base": base_hashes, "adapter": adapter_hashes}, sort_keys=True).encode()
    out_dir = sources.cache_root() / "merged" / hashlib.sha256(material).hexdigest()[:24]
    if (out_dir / MERGED_MARKER).is_file():
        events.info(f"using the merged checkpoint in {out_dir}")
        return out_dir
    torch = require("torch", extra="adapters")
    peft = require("peft", extra="adapters")
    from transformers import AutoModelForCausalLM

    staged = out_dir.with_name(f"{out_dir.name}{artifact.PARTIAL_MARKER}{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        with events.step("merge", f"merging the LoRA adapter {adapter_dir.name} into {checkpoint.name}"):
            for file in checkpoint.iterdir():  # tokenizer and generation files; the weights are written below
                if file.is_file() and not file.name.endswith((".safetensors", ".bin", ".index.json")):
                    shutil.copy2(file, staged / file.name)
            model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=trust_remote_code,
                                                         **{dtype_keyword(): torch.float32})
            stored_dtype = _stored_dtype(checkpoint, torch)
            try:
                merged = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            except (RuntimeError, ValueError, KeyError) as exc:
                raise UsageError(f"adapter '{adapter_dir}' does not fit the base model {checkpoint.name} "
                                 f"({first_line(exc)})", hint="use an adapter trained on this base model") from exc
            merged.to(stored_dtype).save_pretrained(staged, safe_serialization=True)
            (staged / MERGED_MARKER).write_text(json.dumps({"base": str(checkpoint), "adapter": str(adapter_dir),
                                                            "adapter_files": adapter_hashes}, indent=2))
        try:
            os.replace(staged, out_dir)
        except OSError:
            if not (out_dir / MERGED_MARKER).is_file():  # another process merged the same pair meanwhile: keep theirs
                raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir


def _stored_dtype(checkpoint: Path, torch):
    """The dtype the base checkpoint stores its weights in (float32 when it does not say)."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, str(name), torch.float32)
