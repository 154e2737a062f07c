"""Artifacts on the Hugging Face Hub: ``push`` an artifact with a model card, ``pull`` one back, and
``artifact_path``, which lets a Hub id stand wherever an artifact directory does.

Everything goes through huggingface_hub, at ``$HF_ENDPOINT`` (read at each call, not only at import),
with its usual token (``HF_TOKEN`` or the token file); no message here ever contains the token.
A pull downloads into ``OUT.partial-<pid>/``, checks every file's sha256 against the manifest and
the backend versions against this machine, and only then moves the directory into place. A Hub id
opened by ``run``/``bench``/``verify`` is pulled once into ``<llmopt cache>/hub/<org>--<name>/<commit>/``
and served from there afterwards, offline included.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from llmopt import artifact, events, sources
from llmopt._deps import require, version_of
from llmopt.artifact import MANIFEST_NAME, Manifest
from llmopt.errors import ArtifactError, LlmoptError, UsageError, first_line
from llmopt.registry import runner_class

CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def endpoint() -> str:
    hub = require("huggingface_hub", extra="hub")
    return os.environ.get("HF_ENDPOINT") or hub.constants.ENDPOINT


def client():
    return require("huggingface_hub", extra="hub").HfApi(endpoint=endpoint())


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not spec.startswith((".", "~"))


@contextlib.contextmanager
def hub_errors(repo_id: str, action: str) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line LlmoptErrors (``action``: 'push to', 'pull')."""
    from huggingface_hub import errors
    import requests

    where = f"Hub repo '{repo_id}' at {endpoint()}"
    try:
        yield
    except errors.HFValidationError as exc:
        raise UsageError(f"'{repo_id}' is not a valid Hub repo id ({first_line(exc)})",
                         hint="expected org/name, e.g. me/smollm2-onnx-int4") from exc
    except errors.RepositoryNotFoundError as exc:
        raise ArtifactError(f"{where} not found (or not readable with this token)",
                            hint="check the id; a private repo needs HF_TOKEN or `hf auth login`") from exc
    except errors.RevisionNotFoundError as exc:
        raise ArtifactError(f"{where}: revision not found") from exc
    except errors.LocalEntryNotFoundError as exc:  # what a download raises when the endpoint cannot be reached
        raise LlmoptError(f"cannot {action} {where}: the endpoint cannot be reached") from exc
    except errors.EntryNotFoundError as exc:
        raise ArtifactError(f"{where} has no {MANIFEST_NAME}: it does not hold an llmopt artifact",
                            hint="push one with `llmopt push ARTIFACT REPO_ID`") from exc
    except errors.OfflineModeIsEnabled as exc:
        raise LlmoptError(f"cannot {action} {where}: HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE") from exc
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise LlmoptError(f"not allowed to {action} {where} (HTTP {status})",
                              hint="set HF_TOKEN (or `hf auth login`) to a token with write access") from exc
        raise LlmoptError(f"cannot {action} {where}: {first_line(exc)}") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise LlmoptError(f"cannot {action} {where}: the endpoint cannot be reached") from exc


# -- push -------------------------------------------------------------------------------------


def model_card(manifest: Manifest, repo_id: str) -> str:
    """README.md of a pushed artifact: what it is, how it was built, how to use it."""
    source = manifest.source or {}
    quantization = manifest.quantization or {}
    weights = quantization.get("weight_format", "none")
    if weights != "none":
        weights += "".join(f", {name} {quantization[name]}" for name in ("group_size", "algorithm", "ratio")
                           if quantization.get(name) not in (None, "auto"))
    metrics = manifest.validation
    parity = ("not run" if not metrics else
              f"{'passed' if metrics.get('passed') else 'FAILED'}: top-1 agreement {metrics.get('top1_agreement', 0):.3f}, "
              f"mean KL {metrics.get('mean_kl', 0):.4f} over {metrics.get('tokens')} tokens "
              f"(against {metrics.get('reference', 'PyTorch fp32')})")
    adapter = source.get("adapter")
    rows = {
        "target": manifest.target,
        "source model": f"{source.get('model')}" + (f" @ {source['revision']}" if source.get("revision") else ""),
        "LoRA adapter": f"{adapter['id']} (merged before export)" if adapter else "none",
        "shapes": ", ".join(f"{key}={value}" for key, value in manifest.shapes.items()),
        "precision": manifest.precision,
        "quantization": weights,
        "parity": parity,
        "backend versions": ", ".join(f"{name} {version}" for name, version in manifest.backend_versions.items()) or "-",
        "llmopt": f"{manifest.llmopt_version} (artifact format {manifest.format_version})",
        "files": f"{len(manifest.files)}, each with its sha256 in {MANIFEST_NAME}",
    }
    front = ["---", "library_name: llmopt", f"tags: [llmopt, {manifest.target}, static-shapes]"]
    if source.get("model") and looks_like_repo_id(str(source["model"])):
        front.append(f"base_model: {source['model']}")
    table = "\n".join(f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows.items())
    return "\n".join(front + ["---", "", f"# {repo_id}", "",
                              f"A {manifest.target} artifact compiled by llmopt: fixed shapes, ready to run.", "",
                              "| | |", "|---|---|", table, "", "```bash",
                              f"llmopt pull {repo_id} -o ./artifact   # verifies every file's sha256",
                              f"llmopt run {repo_id} \"Hello\"          # or run it straight from the Hub id",
                              "```", ""])


def push(path: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> dict[str, Any]:
    """Upload the artifact at ``path`` (re-hashed first) and its model card to ``repo_id``; files of an
    earlier push that this artifact does not have are removed in the same commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    path = Path(path)
    manifest = artifact.load(path, verify=True)
    api = client()
    names = list(manifest.files) + [MANIFEST_NAME]
    with hub_errors(repo_id, "push to"):
        with events.step("push", f"pushing {path} to {repo_id}"):
            api.create_repo(repo_id, private=private, exist_ok=True)
            stale = [name for name in api.list_repo_files(repo_id)
                     if name not in names and name not in (CARD_NAME, ".gitattributes")]
            operations = [CommitOperationAdd(name, str(path / name)) for name in names]
            operations.append(CommitOperationAdd(CARD_NAME, model_card(manifest, repo_id).encode("utf-8")))
            operations += [CommitOperationDelete(name) for name in stale]
            info = api.create_commit(repo_id, operations, commit_message=message or
                                     f"llmopt push: {manifest.target} {manifest.precision} "
                                     f"{(manifest.quantization or {}).get('weight_format', 'none')}")
    return {"repo_id": repo_id, "commit": info.oid, "url": f"{endpoint()}/{repo_id}", "files": len(names),
            "size_bytes": sum((path / name).stat().st_size for name in names)}


# -- pull -------------------------------------------------------------------------------------


def pull(repo_id: str, output: str | Path, revision: str | None = None, force: bool = False) -> dict[str, Any]:
    """Download an artifact into ``output``: nothing is there until every file's sha256 and the backend
    versions have been checked. Returns the commit and the manifest."""
    hub = require("huggingface_hub", extra="hub")
    output = Path(output)
    artifact.check_output_free(output, force)
    with hub_errors(repo_id, "pull"):
        commit = client().model_info(repo_id, revision=revision).sha or revision
        with artifact.staging(output, force) as workdir:
            with events.step("pull", f"pulling {repo_id}@{str(commit)[:12]} into {output}"):
                def fetch(name: str) -> None:
                    hub.hf_hub_download(repo_id, name, revision=commit, local_dir=workdir, endpoint=endpoint())

                fetch(MANIFEST_NAME)
                manifest = artifact.read_manifest(workdir)
                for name in manifest.files:
                    fetch(name)
                shutil.rmtree(workdir / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
            check_pulled(repo_id, workdir, manifest)
    return {"repo_id": repo_id, "commit": commit, "output": str(output), "manifest": manifest}


def check_pulled(repo_id: str, workdir: Path, manifest: Manifest) -> None:
    """Every file's sha256 as the manifest records it, and backends this machine can load it with."""
    for name, expected in manifest.files.items():
        file = workdir / name
        if not file.is_file() or artifact.sha256_file(file) != expected:
            raise ArtifactError(f"pull {repo_id}: file '{name}' does not match the sha256 in its manifest; nothing written",
                                hint="the remote copy is corrupt or was changed: push the artifact again")
    runner = runner_class(manifest.target, manifest.static)
    installed = {name: version_of(name) for name in runner.backend_distributions}
    try:
        artifact.check_backend_versions(Path(repo_id), manifest, installed, runner.extra)
    except ArtifactError as exc:
        raise ArtifactError(f"pull {repo_id}: {exc.message.removeprefix(f'artifact {repo_id!r} ')}; nothing written",
                            hint=exc.hint) from exc


# -- a Hub id where an artifact path goes -----------------------------------------------------


def artifact_path(spec: str | Path) -> Path:
    """``spec`` as a local artifact directory: itself when it exists (or is not a Hub id), else the
    Hub repo ``org/name[@revision]`` pulled once into the llmopt cache (and reused offline)."""
    text = str(spec)
    if Path(text).expanduser().exists() or not looks_like_repo_id(text) or Path(text.split("/")[0]).is_dir():
        return Path(text)  # a missing path under a local directory (out/typo) is a local path, not a repo
    repo_id, _, revision = text.partition("@")
    root = sources.cache_root() / "hub" / repo_id.replace("/", "--")
    ref = root / "refs" / (revision or "main").replace("/", "--")
    known = ref.read_text(encoding="utf-8").strip() if ref.is_file() else None
    if sources._hub_offline():
        if known and (root / known / MANIFEST_NAME).is_file():
            return root / known
        raise ArtifactError(f"artifact '{text}' does not exist, and HF_HUB_OFFLINE is set with no pulled copy of "
                            f"the Hub repo {repo_id}", hint=f"pull it once online: llmopt pull {repo_id} -o DIR")
    try:
        with hub_errors(repo_id, "pull"):
            commit = client().model_info(repo_id, revision=revision or None, timeout=sources.HUB_TIMEOUT_S).sha
    except LlmoptError as exc:
        if known and (root / known / MANIFEST_NAME).is_file():  # unreachable: the copy pulled before
            events.warning(f"{endpoint()} unreachable; using the copy of {text} pulled before ({known[:12]})")
            return root / known
        raise type(exc)(f"artifact '{text}' is not a local directory, and {exc.message}", hint=exc.hint) from exc
    target = root / commit
    if not (target / MANIFEST_NAME).is_file():
        pull(repo_id, target, revision=commit)
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.tmp-{os.getpid()}")
    tmp.write_text(commit, encoding="utf-8")
    os.replace(tmp, ref)
    return target

