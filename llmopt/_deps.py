"""Import a target's heavy dependency only when that target is used.

``require("openvino", extra="openvino")`` returns the module, or raises a one-line
``MissingDependencyError`` that says which pip command installs it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import types

from llmopt.errors import MissingDependencyError

# Extras whose packages are not on PyPI's default index or need a special environment.
_INSTALL_NOTES = {
    "neuron": "make install-neuron (needs the AWS Neuron SDK pip index, Python < 3.12, an Inferentia/Trainium host)",
    "tensorrt": "make install-tensorrt (needs an NVIDIA GPU and the NVIDIA pip index)",
}


def install_hint(extra: str) -> str:
    return _INSTALL_NOTES.get(extra, f"pip install 'llmopt[{extra}]'")


def require(module: str, extra: str, package: str | None = None) -> types.ModuleType:
    """Import ``module`` or raise a one-line error naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = package or module.split(".")[0]
        raise MissingDependencyError(
            f"the '{extra}' target needs {missing}, which is not installed ({exc.name or missing})",
            hint=f"install it with: {install_hint(extra)}",
        ) from exc


# Builds of one library published under other names (same import name, same version numbers).
_FLAVOURS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnxruntime-genai": ("onnxruntime-genai", "onnxruntime-genai-cuda"),
}


def version_of(distribution: str) -> str | None:
    """Installed version of a distribution (or of its GPU flavour), or None; never imports it."""
    for name in _FLAVOURS.get(distribution, (distribution,)):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the weights' dtype in the installed transformers.

    transformers 4.56 renamed ``torch_dtype`` to ``dtype``; before it, ``dtype`` is passed on to the
    model's constructor, which rejects it (TensorRT-LLM's own environments pin such releases).
    """
    from packaging.version import Version

    installed = version_of("transformers")
    return "dtype" if installed is None or Version(installed) >= Version("4.56") else "torch_dtype"
