"""What a benchmark ran on (recorded in every JSON row), thread counts, and peak resident memory."""

from __future__ import annotations

import platform
import re
import sys
import threading
from pathlib import Path

import psutil

from llmopt import __version__
from llmopt._deps import version_of
from llmopt.hardware import cpu_description, usable_cpus

LIBRARIES = ("numpy", "torch", "transformers", "optimum", "optimum-intel", "optimum-onnx", "onnxruntime",
             "onnxruntime-genai", "openvino", "openvino-genai", "nncf", "llama_cpp_python")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    return cpu_description()[0] or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    present = cpu_description()[1]
    return [flag for flag in CPU_FLAGS if flag in present]


def machine_info() -> dict:
    memory = psutil.virtual_memory()
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "usable_cpus": usable_cpus(),
        "memory_bytes": memory.total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llmopt": __version__,
        "versions": {name: version for name in LIBRARIES if (version := version_of(name)) is not None},
    }


class PeakRss:
    """Peak resident memory of this process since the last ``reset``.

    On Linux the kernel's own high-water mark (VmHWM) is exact and can be reset by writing 5 to
    /proc/self/clear_refs; elsewhere a thread samples psutil's RSS every few milliseconds.
    """

    def __init__(self, interval_s: float = 0.005):
        self.method = "vmhwm" if self._kernel_hwm() is not None and self._clear() else "sampled"
        self._interval = interval_s
        self._sampled = 0
        self._stop = threading.Event()
        if self.method == "sampled":
            self._process = psutil.Process()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    @staticmethod
    def _kernel_hwm() -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None

    @staticmethod
    def _clear() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._sampled = max(self._sampled, self._process.memory_info().rss)

    def reset(self) -> None:
        if self.method == "vmhwm":
            self._clear()
        else:
            self._sampled = psutil.Process().memory_info().rss

    def peak(self) -> int:
        if self.method == "vmhwm":
            return self._kernel_hwm() or 0
        return max(self._sampled, psutil.Process().memory_info().rss)

    def close(self) -> None:
        self._stop.set()


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def runtimes_loaded() -> list[str]:
    """The inference runtimes imported into this process (a worker should hold exactly one)."""
    names = {"torch": "torch", "onnxruntime": "onnxruntime", "onnxruntime_genai": "onnxruntime-genai",
             "openvino": "openvino", "openvino_genai": "openvino-genai", "llama_cpp": "llama-cpp"}
    return [label for module, label in names.items() if module in sys.modules]
