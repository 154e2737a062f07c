"""What this machine can build and run, and whether an artifact will load here.

``machine_report()`` backs ``llmopt doctor``: the targets whose packages are installed (versions
read from package metadata, nothing imported), what the others need, the CPU, GPUs, Neuron
devices, and installed version combinations known to break. ``check_artifact()`` backs
``llmopt verify``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from llmopt import __version__, artifact, hub
from llmopt.architectures import ARCHITECTURES
from llmopt._deps import install_hint, version_of
from llmopt.errors import ArtifactError, LlmoptError
from llmopt.hardware import cpu_description, query_nvidia_smi
from llmopt.registry import TARGETS, runner_class

# The extras shown by doctor: the PyTorch baseline, every target, and the ONNX GPU flavour.
EXTRAS: tuple[str, ...] = ("pytorch", *TARGETS, "gpu")

# Installed combinations known to break. Every distribution in "when" must be installed with a
# version in its range ("" = any version) for the row to apply. "same_release" rows apply when the
# listed distributions are installed at different year.minor releases.
KNOWN_BAD: list[dict[str, Any]] = [
    {
        "when": {"transformers": ">=5.0.0.dev0", "optimum-onnx": "<0.2"},
        "why": "optimum-onnx 0.1.x uses transformers APIs that transformers 5 removed; ONNX export fails",
        "fix": "pip install 'transformers<5'",
    },
    {
        "when": {"onnxruntime": "", "onnxruntime-gpu": ""},
        "why": "onnxruntime and onnxruntime-gpu ship the same 'onnxruntime' module; the last one installed wins",
        "fix": "pip uninstall -y onnxruntime onnxruntime-gpu, then install only the one you need",
    },
    {
        "when": {"onnxruntime-genai": "", "onnxruntime-genai-cuda": ""},
        "why": "onnxruntime-genai and onnxruntime-genai-cuda ship the same 'onnxruntime_genai' module",
        "fix": "pip uninstall -y onnxruntime-genai onnxruntime-genai-cuda, then install only the one you need",
    },
    {
        "same_release": ("openvino", "openvino-tokenizers", "openvino-genai"),
        "why": "openvino-tokenizers and openvino-genai load openvino's shared libraries and must match its release",
        "fix": "install the three at the same version, e.g. pip install 'llmopt[openvino]' -c constraints-cpu.txt",
    },
]

# CPU features that decide which kernels the runtimes use.
CPU_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",  # x86
    "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm",  # arm64
)


# -- versions ---------------------------------------------------------------------------------


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` is in a PEP 440 range like '>=4.51,<5' (pre-releases count; an unparsable version does not)."""
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version: '2026.4.1.0' -> (2026, 4, 1, 0); () when it does not parse."""
    try:
        return Version(version).release
    except InvalidVersion:
        return ()


def extras_requirements() -> dict[str, list[tuple[str, str]]]:
    """llmopt's extras from its package metadata: extra -> [(distribution, version range)]."""
    try:
        metadata = importlib.metadata.metadata("llmopt")
    except importlib.metadata.PackageNotFoundError:
        return {}
    extras = metadata.get_all("Provides-Extra") or []
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]

    def expand(extra: str, seen: frozenset[str]) -> list[tuple[str, str]]:
        result = []
        for requirement in requirements:
            if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
                continue
            if requirement.name == "llmopt":  # 'llmopt[pytorch]' inside another extra
                for nested in sorted(requirement.extras - seen - {extra}):
                    result += expand(nested, seen | {extra})
            else:
                result.append((requirement.name, str(requirement.specifier)))
        return result

    return {extra: expand(extra, frozenset()) for extra in extras}


def target_status(extra: str, requirements: list[tuple[str, str]]) -> dict[str, Any]:
    packages = []
    for name, spec in requirements:
        version = version_of(name)
        packages.append({"name": name, "required": spec, "version": version,
                         "ok": version is not None and satisfies(version, spec)})
    missing = [f"{p['name']}{p['required']}" for p in packages if p["version"] is None]
    mismatched = [f"{p['name']} {p['version']} (needs {p['required']})" for p in packages if p["version"] and not p["ok"]]
    return {
        "name": extra,
        "installed": bool(packages) and not missing and not mismatched,
        "packages": packages,
        "missing": missing,
        "mismatched": mismatched,
        "install": install_hint(extra),
    }


def known_bad_combinations(versions: dict[str, str | None] | None = None) -> list[dict[str, Any]]:
    """The rows of KNOWN_BAD that apply to the installed (or given) versions."""
    def installed(name: str) -> str | None:
        return versions.get(name) if versions is not None else version_of(name)

    found = []
    for row in KNOWN_BAD:
        if "when" in row:
            have = {name: installed(name) for name in row["when"]}
            if all(v is not None and satisfies(v, row["when"][n]) for n, v in have.items()):
                found.append({"packages": have, "why": row["why"], "fix": row["fix"]})
        else:
            have = {name: installed(name) for name in row["same_release"]}
            releases = {release(v)[:2] for v in have.values() if v is not None}
            if len(releases) > 1:
                found.append({"packages": {n: v for n, v in have.items() if v}, "why": row["why"], "fix": row["fix"]})
    return found


# -- hardware ---------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    model, flags = cpu_description()
    try:
        import psutil

        physical, memory = psutil.cpu_count(logical=False), psutil.virtual_memory().total
    except Exception:  # psutil is a dependency, but doctor must still print on a broken install
        physical, memory = None, None
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "physical_cores": physical,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": memory,
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
    }


def nvidia_gpus() -> list[dict[str, str]] | str:
    """GPUs from nvidia-smi, [] without it, or a one-line reason when it fails."""
    return query_nvidia_smi(("name", "memory.total", "driver_version", "compute_cap"))


def neuron_devices() -> list[str]:
    return sorted(str(path) for path in Path("/dev").glob("neuron*"))


def machine_report() -> dict[str, Any]:
    requirements = extras_requirements()
    targets = [target_status(extra, requirements.get(extra, [])) for extra in EXTRAS]
    problems = known_bad_combinations()
    return {
        "llmopt": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "metadata": bool(requirements),
        "targets": targets,
        "architectures": list(ARCHITECTURES),
        "cpu": cpu_info(),
        "gpus": nvidia_gpus(),
        "neuron_devices": neuron_devices(),
        "problems": problems,
        "ok": not problems,
    }


# -- artifacts --------------------------------------------------------------------------------

VERIFY_PROMPT = "Hello"


def check_artifact(path: str | Path, run: bool = False, max_new_tokens: int = 4) -> dict[str, Any]:
    """Re-hash every file, check this machine's backend versions can load it, and with ``run``
    load it and generate a few tokens. Raises an LlmoptError naming the first problem.
    ``path``: a directory, or the Hub id of a pushed artifact (pulled once, verified)."""
    path = hub.artifact_path(path)
    manifest = artifact.load(path, verify=True)
    runner = runner_class(manifest.target, manifest.static)
    installed = {name: version_of(name) for name in runner.backend_distributions}
    artifact.check_backend_versions(path, manifest, installed, runner.extra)
    result: dict[str, Any] = {
        "path": str(path),
        "target": manifest.target,
        "files_verified": len(manifest.files),
        "backend_versions": {
            name: {"built": manifest.backend_versions.get(name), "installed": installed[name]} for name in installed
        },
    }
    if run:
        result["generated"] = _generate_a_few(runner, path, max_new_tokens)
    return result


def _generate_a_few(runner_type, path: Path, max_new_tokens: int) -> dict[str, Any]:
    from llmopt import generation
    from llmopt.runners.base import SamplingConfig

    try:
        runner = runner_type.load(path, verify=False)  # check_artifact has just verified it
        try:
            output = generation.generate(runner, [VERIFY_PROMPT], SamplingConfig(max_new_tokens=max_new_tokens), chat=False)[0]
        finally:
            runner.close()
    except LlmoptError:
        raise
    except Exception as exc:  # a backend that cannot load or run it: one line, the traceback under LLMOPT_DEBUG
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ArtifactError(f"artifact '{path}' failed to load or generate: {type(exc).__name__}: {first}") from exc
    if not output.token_ids:
        raise ArtifactError(f"artifact '{path}' generated no token")
    return {"prompt": VERIFY_PROMPT, "tokens": len(output.token_ids), "text": output.text}
