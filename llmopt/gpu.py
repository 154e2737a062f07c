"""What an artifact compiled for one NVIDIA GPU needs from the machine that loads it.

A TensorRT engine (built by TensorRT-LLM, or by onnxruntime's TensorRT execution provider into an
EPContext model) runs only on the GPU architecture (SM) it was built for and only with the exact
TensorRT version that built it; loading one anyway fails deep in C++. The manifest records both
(``runtime.gpu``, ``runtime.versions``) and ``check_compiled_for_this_gpu`` compares them with this
machine before any NVIDIA library is imported. Exporters and runners of both routes share it, so
the two meet only through the artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmopt._deps import install_hint, version_of
from llmopt.errors import ArtifactError, MissingDependencyError
from llmopt.hardware import DetectedGpu, detect_gpus, sm_architecture

TENSORRT_EP = "TensorrtExecutionProvider"  # onnxruntime's TensorRT execution provider
# TensorRT's Python distribution is published under several names (same version numbers).
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-cu13", "tensorrt-cu13-libs",
                          "tensorrt-libs")


def installed_tensorrt_version() -> str | None:
    """TensorRT's version from the installed distributions (no import), or None."""
    for name in TENSORRT_DISTRIBUTIONS:
        found = version_of(name)
        if found:
            return found
    return None


def gpu_record(gpu: DetectedGpu) -> dict[str, Any]:
    """How the manifest records the GPU an engine was built on."""
    return {"name": gpu.name, "sm": gpu.sm, "architecture": gpu.architecture, "memory_bytes": gpu.memory_bytes}


def check_compiled_for_this_gpu(path: Path, runtime: dict[str, Any], *, extra: str, tied_to: tuple[str, ...],
                                gpus: list[DetectedGpu] | None = None,
                                installed: dict[str, str | None] | None = None) -> DetectedGpu:
    """Refuse, with the reason, a compiled GPU artifact this machine cannot run. Imports no NVIDIA library.

    ``runtime`` is the manifest's runtime section: ``gpu`` (name, sm) and ``versions``; ``tied_to``
    names the distributions whose exact version the engine needs. Returns the GPU it will run on.
    """
    built_gpu = runtime.get("gpu") or {}
    gpus = detect_gpus() if gpus is None else gpus
    if not gpus:
        where = f" ({built_gpu['name']})" if built_gpu.get("name") else ""
        raise MissingDependencyError(
            f"artifact '{path}' is compiled for an NVIDIA GPU and needs an NVIDIA GPU; this machine has none "
            "(nvidia-smi finds no GPU)",
            hint=f"run it on a machine with the GPU it was built for{where}",
        )
    current = gpus[0]
    if built_gpu.get("sm") is not None and int(built_gpu["sm"]) != current.sm:
        built_sm = int(built_gpu["sm"])
        raise ArtifactError(
            f"artifact '{path}' is a TensorRT engine built for sm{built_sm} ({sm_architecture(built_sm)}, "
            f"{built_gpu.get('name', 'unknown GPU')}) but this machine's GPU is {current.name} "
            f"(sm{current.sm}, {current.architecture}); an engine runs only on the GPU architecture it was built for",
            hint="re-export it on this machine",
        )
    built_versions = runtime.get("versions") or {}
    have = installed if installed is not None else {name: _installed(name) for name in tied_to}
    for name in tied_to:
        built = built_versions.get(name)
        if built is None:
            continue
        if have.get(name) is None:
            raise MissingDependencyError(
                f"artifact '{path}' needs {name} {built}, which is not installed",
                hint=f"install it with: {install_hint(extra)}",
            )
        if have[name] != built:
            raise ArtifactError(
                f"artifact '{path}' is a TensorRT engine built with {name} {built}; this machine has {have[name]}, "
                "and engines load only with the exact version that built them",
                hint=f"install {name}=={built}, or re-export the artifact here",
            )
    return current


def _installed(name: str) -> str | None:
    return installed_tensorrt_version() if name == "tensorrt" else version_of(name)


def require_gpu(path: Path, provider: str, hint: str) -> DetectedGpu:
    """The first NVIDIA GPU, or a one-line refusal naming the artifact's provider."""
    gpus = detect_gpus()
    if not gpus:
        raise MissingDependencyError(
            f"artifact '{path}' runs on provider {provider} and needs an NVIDIA GPU; this machine has none "
            "(nvidia-smi finds no GPU)",
            hint=hint,
        )
    return gpus[0]


def check_session_provider(session, wanted: str, what: str, hint: str) -> None:
    """onnxruntime falls back to the next provider, with only a logged warning, when one fails to load.

    ``session.get_providers()`` lists the providers the session really registered, in priority order:
    the wanted one must be first, or the session is refused instead of running somewhere else.
    """
    registered = list(session.get_providers())
    if not registered or registered[0] != wanted:
        raise ArtifactError(
            f"{what} needs onnxruntime's {wanted}, but the session runs on {', '.join(registered) or 'nothing'} "
            f"(the provider failed to load, and onnxruntime would silently fall back)",
            hint=hint,
        )
