"""The on-disk artifact: a directory with the backend's files and ``llmopt.json``, written last.

Writing: ``staging(output)`` yields ``OUT.partial-<pid>/``; on success the manifest is written
and the directory is moved into place. An existing artifact is only replaced with ``force`` and
is swapped out by renames, so the output path holds the old artifact or the new one, never a mix.

Reading: ``load(path)`` checks the manifest's format version, that every file is present and
has its recorded sha256, and returns the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from packaging.version import InvalidVersion, Version

from llmopt import __version__
from llmopt.errors import ArtifactError, UsageError

MANIFEST_NAME = "llmopt.json"
FORMAT_VERSION = 1
PARTIAL_MARKER = ".partial-"


@dataclass
class Manifest:
    target: str
    recipe: dict[str, Any]
    source: dict[str, Any]
    backend_versions: dict[str, str | None]
    shapes: dict[str, Any]
    precision: str
    quantization: dict[str, Any]
    io: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    llmopt_version: str = __version__
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    cache_key: str | None = None  # llmopt.cache key of the inputs this artifact was built from

    @property
    def batch_size(self) -> int:
        return int(self.shapes["batch_size"])

    @property
    def sequence_length(self) -> int:
        return int(self.shapes["sequence_length"])

    @property
    def static(self) -> bool:
        return bool(self.shapes.get("static", False))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Manifest":
        version = data.get("format_version")
        if not isinstance(version, int):
            raise ArtifactError(f"{where}: manifest has no integer format_version")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: manifest format {version} is newer than this llmopt reads ({FORMAT_VERSION})",
                hint="upgrade llmopt or re-export the artifact",
            )
        known = set(cls.__dataclass_fields__)
        missing = [name for name in ("target", "recipe", "shapes", "files") if name not in data]
        if missing:
            raise ArtifactError(f"{where}: manifest lacks {', '.join(missing)}")
        return cls(**{key: value for key, value in data.items() if key in known})


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` except the manifest, by POSIX relative path."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            hashes[path.relative_to(root).as_posix()] = sha256_file(path)
    return hashes


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def copy_body(source: Path, workdir: Path) -> None:
    """Every file of the artifact ``source`` but its manifest into ``workdir``: a body to rebuild from."""
    shutil.copytree(source, workdir, dirs_exist_ok=True, ignore=lambda _, names: [n for n in names if n == MANIFEST_NAME])


def check_output_free(output: Path, force: bool) -> None:
    """Refuse before any work when the output exists and --force was not given."""
    if output.exists() and not force:
        raise UsageError(f"output '{output}' already exists", hint="pass --force to replace it, or choose another -o")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output '{output}' exists and is not a directory")


def _swap_into_place(staged: Path, output: Path) -> None:
    if not output.exists():
        try:
            os.replace(staged, output)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another export won the race since the check
                raise UsageError(f"output '{output}' already exists", hint="another export wrote it meanwhile") from exc
            raise
        return
    retired = output.with_name(f"{output.name}.old-{os.getpid()}")
    os.replace(output, retired)
    try:
        os.replace(staged, output)
    except OSError:
        os.replace(retired, output)  # put the old artifact back rather than leave nothing
        raise
    shutil.rmtree(retired, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_partials(output: Path) -> None:
    """Remove ``OUT.partial-<pid>`` directories left by exports that were killed (their pid is gone)."""
    for candidate in output.parent.glob(f"{output.name}{PARTIAL_MARKER}*"):
        pid = candidate.name.rsplit(PARTIAL_MARKER, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)


@contextlib.contextmanager
def staging(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty sibling work directory; the caller writes the artifact body into it.

    The caller must call ``finalize(workdir, manifest)`` before leaving the block; on any
    exception the work directory is removed and the output path is untouched.
    """
    output = Path(output)
    check_output_free(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_partials(output)
    workdir = output.with_name(f"{output.name}{PARTIAL_MARKER}{os.getpid()}")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    try:
        yield workdir
        if not (workdir / MANIFEST_NAME).exists():
            raise ArtifactError(f"internal: artifact for '{output}' was not finalized")
        check_output_free(output, force)  # another export may have won the race meanwhile
        _swap_into_place(workdir, output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def finalize(workdir: Path, manifest: Manifest) -> Manifest:
    """Hash every file and write the manifest, last, with an fsync so it is durable."""
    manifest.files = hash_tree(workdir)
    path = workdir / MANIFEST_NAME
    with path.open("w", encoding="utf-8") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def read_manifest(path: Path) -> Manifest:
    """Parse the manifest without checking files (for inspect and for cheap checks)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact '{path}' does not exist")
    if not path.is_dir():
        raise ArtifactError(f"artifact '{path}' is not a directory")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(
            f"'{path}' is not an llmopt artifact: {MANIFEST_NAME} is missing",
            hint="an interrupted export leaves no manifest; re-export it",
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object")
    return Manifest.from_dict(data, str(manifest_path))


def verify_files(path: Path, manifest: Manifest) -> None:
    """Every recorded file present with its sha256, and no recorded file missing."""
    for relative, expected in manifest.files.items():
        file_path = path / relative
        if not file_path.is_file():
            raise ArtifactError(f"artifact '{path}': file '{relative}' is missing", hint="re-export the artifact")
        if sha256_file(file_path) != expected:
            raise ArtifactError(
                f"artifact '{path}': file '{relative}' is corrupt (sha256 differs from the manifest)",
                hint="re-export the artifact",
            )


def load(path: str | Path, verify: bool = True) -> Manifest:
    """Read and check an artifact's manifest; with ``verify`` re-hash every file."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return manifest


def _major_minor(version: str) -> tuple[int, ...]:
    """'2026.4.1' -> (2026, 4); () for a version that does not parse (older than any)."""
    try:
        return Version(version).release[:2]
    except InvalidVersion:
        return ()


def check_backend_versions(path: Path, manifest: Manifest, installed: dict[str, str | None], extra: str) -> None:
    """Refuse an artifact built with a newer backend (major.minor) than the one installed."""
    for name, built in manifest.backend_versions.items():
        if built is None or name not in installed:
            continue
        have = installed[name]
        if have is None:
            raise ArtifactError(
                f"artifact '{path}' needs {name} (built with {built}), which is not installed",
                hint=f"pip install 'llmopt[{extra}]'",
            )
        if _major_minor(have) < _major_minor(built):
            raise ArtifactError(
                f"artifact '{path}' was built with {name} {built}, this machine has {have}",
                hint=f"re-export it here or install {name}=={built}",
            )


def model_type_of(path: Path) -> str | None:
    """The model_type in an artifact's or checkpoint's config.json, if it has one."""
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
