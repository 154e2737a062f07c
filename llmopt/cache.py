"""The compile cache: an export whose inputs did not change reuses the artifact built last time.

The key is the sha256 of a canonical JSON of everything an artifact depends on: the hash of every
source checkpoint file, the resolved recipe (model id and revision included), whether it was
validated, the llmopt version and artifact format, the exporter's backend versions, and the host
machine. Entries live in ``<cache dir>/<key>/`` as complete artifacts.

Safe for several CI jobs sharing one cache directory: entries appear only by ``os.replace`` of a
finished copy (a job that loses the race drops its copy), are never modified, and are re-hashed
every time they are served; a corrupt entry is removed and rebuilt, never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

from llmopt import __version__, artifact, events, sources
from llmopt._deps import version_of
from llmopt.artifact import Manifest
from llmopt.errors import ArtifactError
from llmopt.recipe import Recipe

KEY_SCHEMA = 2  # bump when what goes into the key changes
SOURCE_INDEX = "source-hashes.json"  # (path, size, mtime) -> sha256 of source files already hashed
_TMP_PREFIX = ".tmp-"


def default_dir() -> Path:
    """``$LLMOPT_CACHE_DIR/artifacts``, else ``~/.cache/llmopt/artifacts``."""
    return sources.cache_root() / "artifacts"


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def source_files(checkpoint: Path) -> list[Path]:
    """Every regular file of a checkpoint, except under hidden names (download metadata, VCS)."""
    return [
        path for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(checkpoint).parts)
    ]


class ArtifactCache:
    """``remote``: an optional shared store (``llmopt.hub_cache.RemoteCache``) with ``fetch(key, entry)``,
    which fills a missing local entry, and ``upload(key, entry)``, which shares a new one."""

    def __init__(self, root: str | Path, remote: Any = None):
        self.root = Path(root).expanduser()
        self.remote = remote

    # -- the key ------------------------------------------------------------------------------

    def source_hashes(self, checkpoint: Path) -> dict[str, str]:
        """sha256 of each checkpoint file by relative path; unchanged files are not read again."""
        index_path = self.root / SOURCE_INDEX
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            if not isinstance(index, dict):
                index = {}
        except (OSError, ValueError):
            index = {}
        hashes, changed = {}, False
        for path in source_files(checkpoint):
            real = path.resolve()  # Hub snapshots are symlinks into a blob store
            stat = real.stat()
            stamp = [stat.st_size, stat.st_mtime_ns]
            known = index.get(str(real))
            if not (isinstance(known, list) and known[:2] == stamp and len(known) == 3):
                known = stamp + [artifact.sha256_file(real)]
                index[str(real)] = known
                changed = True
            hashes[path.relative_to(checkpoint).as_posix()] = known[2]
        if changed:
            self._write_atomically(index_path, json.dumps(index, indent=0, sort_keys=True))
        return hashes

    def key(self, recipe: Recipe, checkpoint: Path, backend_distributions: tuple[str, ...], validated: bool,
            adapter: dict[str, str] | None = None) -> str:
        """``adapter``: sha256 of a LoRA adapter's files (merged into the weights), by file name."""
        recipe_fields = recipe.to_dict()
        # The weights are keyed by their content (source files below), not by the path or id that
        # named them: a fresh clone elsewhere, or a copy of the checkpoint, hits the same entry.
        recipe_fields["model"] = {name: value for name, value in recipe_fields["model"].items() if name not in ("id", "adapter")}
        material = {
            "schema": KEY_SCHEMA,
            "llmopt": __version__,
            "format": artifact.FORMAT_VERSION,
            "recipe": recipe_fields,
            "validated": validated,
            "source": {"revision": recipe.model.revision, "files": self.source_hashes(Path(checkpoint))},
            "backends": {name: version_of(name) for name in backend_distributions},
            "host": {"machine": platform.machine(), "system": platform.system()},
        }
        if adapter is not None:
            material["adapter"] = adapter
        key = hashlib.sha256(canonical_json(material).encode("ascii")).hexdigest()
        events.info(f"cache key {key}", cache_key=key, cache_dir=str(self.root))
        return key

    # -- entries ------------------------------------------------------------------------------

    def entry(self, key: str) -> Path:
        return self.root / key

    def restore(self, key: str, output: Path, force: bool = False, provenance: dict | None = None) -> Manifest | None:
        """Copy a cached artifact to ``output`` atomically and return its manifest, or None on a miss.

        The copy is re-hashed before it is moved into place, so a corrupt entry is never served:
        it is removed, and the caller builds the artifact again. ``provenance``: manifest fields of
        this request (``source``, ``recipe``) recorded in the copy, since the entry may have been
        built from another path holding the same content (the key leaves the model's path out).
        """
        entry = self.entry(key)
        if not entry.is_dir() and self.remote is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remote.fetch(key, entry)
        if not entry.is_dir():
            events.info("cache miss", cache_key=key)
            return None
        try:
            with events.step("restore", f"cache hit: copying {entry} to {output}"):
                with artifact.staging(output, force) as workdir:
                    # File by file, not copytree: a full disk must surface as ENOSPC, not as a bad entry.
                    for relative in artifact.read_manifest(entry).files:
                        (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(entry / relative, workdir / relative)
                    shutil.copy2(entry / artifact.MANIFEST_NAME, workdir / artifact.MANIFEST_NAME)
                    manifest = artifact.load(workdir, verify=True)
                    if manifest.cache_key != key:
                        raise ArtifactError(f"cache entry '{entry}' holds an artifact with key {manifest.cache_key}")
                    if provenance and any(getattr(manifest, name) != value for name, value in provenance.items()):
                        for name, value in provenance.items():
                            setattr(manifest, name, value)
                        (workdir / artifact.MANIFEST_NAME).write_text(manifest.to_json())
        except (ArtifactError, FileNotFoundError) as exc:  # corrupt, or removed by another job meanwhile
            events.warning(f"cache entry {entry} is unusable ({getattr(exc, 'message', exc)}); rebuilding", cache_key=key)
            self.evict(key)
            return None
        return manifest

    def store(self, key: str, workdir: Path) -> None:
        """Copy a finished artifact into the cache; a failure here never fails the export."""
        entry = self.entry(key)
        if entry.is_dir():
            return
        tmp = _tmp_path(self.root)
        try:
            with events.step("cache-store", f"storing a copy in {entry}"):
                self._sweep_dead_tmp()
                shutil.copytree(workdir, tmp, symlinks=False)
                try:
                    os.replace(tmp, entry)
                except OSError:
                    if not entry.is_dir():
                        raise
                    # another job stored the same key first: same inputs, so keep theirs
        except OSError as exc:
            events.warning(f"could not store the artifact in the cache ({exc}); the export itself succeeded")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.remote is not None and entry.is_dir():
            self.remote.upload(key, entry)

    def evict(self, key: str) -> None:
        """Remove an entry: rename it out of the way first, so no one sees it half deleted."""
        entry = self.entry(key)
        trash = _tmp_path(self.root)
        try:
            os.replace(entry, trash)
        except OSError:
            return  # already gone (another job evicted it)
        shutil.rmtree(trash, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------

    def _write_atomically(self, path: Path, text: str) -> None:
        tmp = _tmp_path(path.parent)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:  # the index only saves time: a read-only or full cache still works
            events.warning(f"could not update {path} ({exc})")
            tmp.unlink(missing_ok=True)

    def _sweep_dead_tmp(self) -> None:
        """Remove copies left by killed jobs of this host (their pid is gone)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in self.root.glob(f"{_TMP_PREFIX}*@{socket.gethostname()}"):
            pid = path.name[len(_TMP_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not artifact.pid_alive(int(pid)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _tmp_path(directory: Path) -> Path:
    # pid and host in the name: a shared (network) cache is swept only by the host that owns the pid
    return directory / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}"


