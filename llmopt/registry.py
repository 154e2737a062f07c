"""The targets llmopt knows, as lazy ``module:Class`` references.

The keys are the CLI's ``--target`` choices and the recipe's allowed ``target`` values: one
source. Nothing here imports a backend; ``load`` imports the target module when a target is used,
and target modules themselves import their heavy libraries only inside methods.
"""

from __future__ import annotations

import importlib

from llmopt.errors import UsageError

EXPORTERS: dict[str, str] = {
    "onnx": "llmopt.exporters.onnx:OnnxExporter",
    "openvino": "llmopt.exporters.openvino:OpenVINOExporter",
    "neuron": "llmopt.exporters.neuron:NeuronExporter",
    "tensorrt": "llmopt.exporters.tensorrt:TensorRTExporter",
}

RUNNERS: dict[str, str] = {
    "onnx": "llmopt.runners.onnx:OnnxRunner",
    "openvino": "llmopt.runners.openvino:OpenVINORunner",
    "neuron": "llmopt.runners.neuron:NeuronRunner",
    "tensorrt": "llmopt.runners.tensorrt:TensorRTRunner",
    "pytorch": "llmopt.runners.pytorch:PyTorchRunner",
    # Artifacts built with `shapes.static: true`: two fully static graphs and llmopt's own small loop.
    "onnx-static": "llmopt.runners.static:OnnxStaticRunner",
    "openvino-static": "llmopt.runners.static:OpenVINOStaticRunner",
}

TARGETS: tuple[str, ...] = tuple(EXPORTERS)


def _load(table: dict[str, str], name: str, what: str):
    if name not in table:
        raise UsageError(f"unknown {what} '{name}'; accepted: {', '.join(table)}")
    module_name, class_name = table[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def exporter_class(target: str):
    return _load(EXPORTERS, target, "target")


def runner_class(target: str, static: bool = False):
    """The runner for a target's artifacts; static-shape artifacts have their own where one exists."""
    if static and f"{target}-static" in RUNNERS:
        return _load(RUNNERS, f"{target}-static", "runner")
    return _load(RUNNERS, target, "runner")
