"""What the accelerators can hold and do: AWS Neuron instances and NVIDIA GPUs.

Pure tables (no import of any vendor library) used by the Neuron and TensorRT exporters to refuse
recipes that cannot work, and to size the pre-flight memory estimate (``llmopt.memory``). The two
detection helpers at the bottom (``detect_gpus``, ``neuron_device_present``) look at this machine
only when asked, and never import a vendor library: they read ``nvidia-smi`` / ``/dev/neuron*``.

Sources:
- Inf2: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/inf2-arch.html
  (each Inferentia2 chip: two NeuronCore-v2 and 32 GiB HBM, i.e. 16 GiB per NeuronCore).
- Trn1: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/trn1-arch.html
  (each Trainium chip: two NeuronCore-v2 and 32 GiB HBM).
- Trn2: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/trn2-arch.html
  (16 Trainium2 chips, 96 GiB HBM each; 64 logical NeuronCores at the default LNC=2).
- GPUs: NVIDIA's CUDA compute capability table (https://developer.nvidia.com/cuda-gpus); bf16 needs
  sm80 (Ampere) or newer, FP8 tensor cores need sm89 (Ada) or sm90 (Hopper) or newer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from llmopt.errors import RecipeError

GIB = 1024**3


# ---------------------------------------------------------------------------------- Neuron


@dataclass(frozen=True)
class NeuronInstance:
    name: str
    family: str  # what optimum-neuron's ``instance_type`` argument takes: inf2, trn1, trn1n, trn2
    chips: int
    neuron_cores: int  # NeuronCores available to tensor parallelism (logical cores on trn2)
    device_memory_bytes: int  # HBM of all chips together
    host_memory_bytes: int

    @property
    def memory_per_core_bytes(self) -> int:
        return self.device_memory_bytes // self.neuron_cores

    @property
    def platform_target(self) -> str:
        """The compiler's platform target for this family (what NEURON_PLATFORM_TARGET_OVERRIDE must say)."""
        return NEURON_PLATFORM_TARGETS[self.family]


# optimum-neuron's own map from instance family to compiler platform target (utils/instance.py,
# INSTANCE_VALUE_MAP, identical in 0.4.0-0.4.5): Inferentia2 compiles for the trn1 target, and an
# export refuses a NEURON_PLATFORM_TARGET_OVERRIDE that differs from it.
NEURON_PLATFORM_TARGETS = {"inf2": "trn1", "trn1": "trn1", "trn1n": "trn1", "trn2": "trn2"}


def _inst(name: str, family: str, chips: int, cores: int, device_gib: int, host_gib: int) -> NeuronInstance:
    return NeuronInstance(name, family, chips, cores, device_gib * GIB, host_gib * GIB)


NEURON_INSTANCES: dict[str, NeuronInstance] = {
    instance.name: instance
    for instance in (
        _inst("inf2.xlarge", "inf2", 1, 2, 32, 16),
        _inst("inf2.8xlarge", "inf2", 1, 2, 32, 128),
        _inst("inf2.24xlarge", "inf2", 6, 12, 192, 384),
        _inst("inf2.48xlarge", "inf2", 12, 24, 384, 768),
        _inst("trn1.2xlarge", "trn1", 1, 2, 32, 32),
        _inst("trn1.32xlarge", "trn1", 16, 32, 512, 512),
        _inst("trn1n.32xlarge", "trn1n", 16, 32, 512, 512),
        _inst("trn2.48xlarge", "trn2", 16, 64, 1536, 2048),
    )
}

# optimum-neuron samples on the device, where only greedy and temperature / top-k / top-p exist:
# a repetition penalty would be silently ignored, so the recipe field and the run flag are refused.
REPETITION_PENALTY_REFUSED = (
    "{where}: a repetition penalty is not available on the neuron target (optimum-neuron samples on the "
    "device with temperature, top_k and top_p only, and ignores it); leave it at 1.0"
)

# ... and its top-k is 1 to 256 (optimum-neuron's sampling config refuses 0 and anything above).
NEURON_MAX_TOP_K = 256
NEURON_TOP_K_REFUSED = "{where}: {value} is not available on the neuron target; on-device sampling takes top_k 1 to 256"

# A NeuronCore-v2 (Inf2, Trn1) addresses half of its chip's 32 GiB: the unit of the memory check
# when the recipe names no instance.
NEURON_CORE_V2_MEMORY_BYTES = 16 * GIB


def neuron_instance(name: str, field: str = "neuron.instance_type") -> NeuronInstance:
    key = name.strip().lower()
    if key not in NEURON_INSTANCES:
        raise RecipeError(
            f"recipe field '{field}': unknown Neuron instance '{name}'; accepted: {', '.join(NEURON_INSTANCES)}"
        )
    return NEURON_INSTANCES[key]


# ---------------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GpuSpec:
    name: str
    sm: int  # compute capability as an integer: 8.9 -> 89
    memory_bytes: int

    @property
    def compute_capability(self) -> str:
        return f"{self.sm // 10}.{self.sm % 10}"

    @property
    def bf16(self) -> bool:
        return self.sm >= 80

    @property
    def fp8(self) -> bool:
        return self.sm >= 89

    @property
    def architecture(self) -> str:
        return sm_architecture(self.sm)


def _gpu(name: str, sm: int, memory_gib: int) -> GpuSpec:
    return GpuSpec(name, sm, memory_gib * GIB)


# Where a card comes in several memory sizes, the plain name is the smaller one (so the pre-flight
# memory check errs on the safe side); the larger is named explicitly.
GPUS: dict[str, GpuSpec] = {
    gpu.name: gpu
    for gpu in (
        _gpu("V100", 70, 16),
        _gpu("V100-32GB", 70, 32),
        _gpu("T4", 75, 16),
        _gpu("A10", 86, 24),
        _gpu("A10G", 86, 24),
        _gpu("A100", 80, 40),
        _gpu("A100-80GB", 80, 80),
        _gpu("L4", 89, 24),
        _gpu("L40", 89, 48),
        _gpu("L40S", 89, 48),
        _gpu("RTX4090", 89, 24),
        _gpu("H100", 90, 80),
        _gpu("H100-NVL", 90, 94),
        _gpu("H200", 90, 141),
        _gpu("GH200", 90, 96),
        _gpu("B200", 100, 180),
    )
}

_ARCHITECTURES = {70: "Volta", 75: "Turing", 80: "Ampere", 86: "Ampere", 87: "Ampere", 89: "Ada",
                  90: "Hopper", 100: "Blackwell", 120: "Blackwell"}


def sm_architecture(sm: int) -> str:
    return _ARCHITECTURES.get(sm, f"sm{sm}")


_NOISE_TOKENS = re.compile(r"^(NVIDIA|TESLA|GEFORCE|SXM\d*|PCIE|HBM\d*E?)$")


def _split_gpu_name(name: str) -> tuple[str, int | None]:
    """'NVIDIA A100-SXM4-80GB' -> ('A100', 80); 'GeForce RTX 4090' -> ('RTX4090', None)."""
    tokens = [token for token in re.split(r"[\s_\-]+", name.upper()) if token and not _NOISE_TOKENS.match(token)]
    memory = None
    kept = []
    for token in tokens:
        match = re.fullmatch(r"(\d+)GB", token)
        if match:
            memory = int(match.group(1))
        else:
            kept.append(token)
    base = "-".join(kept).replace("RTX-", "RTX")
    return base, memory


def gpu_spec(name: str, field: str = "tensorrt.gpu") -> GpuSpec:
    """A GPU by the name a person writes or nvidia-smi prints (H100, a100-80gb, 'NVIDIA H100 80GB HBM3')."""
    base, memory = _split_gpu_name(name)
    if memory is not None and f"{base}-{memory}GB" in GPUS:
        return GPUS[f"{base}-{memory}GB"]
    if base in GPUS:
        return GPUS[base]
    raise RecipeError(f"recipe field '{field}': unknown GPU '{name}'; accepted: {', '.join(GPUS)}")


# ---------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class DetectedGpu:
    name: str
    sm: int
    memory_bytes: int

    @property
    def architecture(self) -> str:
        return sm_architecture(self.sm)


def _parse_compute_cap(text: str) -> int:
    major, _, minor = text.strip().partition(".")
    return int(major) * 10 + int(minor or 0)


def query_nvidia_smi(fields: tuple[str, ...], timeout_s: float = 15.0) -> list[dict[str, str]] | str:
    """One row per GPU from ``nvidia-smi --query-gpu`` (no CUDA library import): [] without nvidia-smi,
    or a one-line reason when it fails. The one place this machine's GPUs are read."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        completed = subprocess.run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=timeout_s, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    rows = []
    for line in completed.stdout.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == len(fields):
            rows.append(dict(zip(fields, parts)))
    return rows


def detect_gpus(timeout_s: float = 10.0) -> list[DetectedGpu]:
    """The NVIDIA GPUs of this machine via ``nvidia-smi``; [] when none (or nvidia-smi fails)."""
    rows = query_nvidia_smi(("name", "compute_cap", "memory.total"), timeout_s)
    gpus = []
    for row in rows if isinstance(rows, list) else []:
        try:
            gpus.append(DetectedGpu(row["name"], _parse_compute_cap(row["compute_cap"]),
                                    int(float(row["memory.total"].split()[0])) * 1024**2))  # "81559 MiB"
        except ValueError:
            continue
    return gpus


def neuron_device_present() -> bool:
    """True when this machine has a Neuron device (``/dev/neuron0``) or ``neuron-ls`` finds one."""
    if os.path.exists("/dev/neuron0"):
        return True
    neuron_ls = shutil.which("neuron-ls")
    if neuron_ls is None:
        return False
    try:
        completed = subprocess.run([neuron_ls, "--json-output"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return completed.returncode == 0 and "neuron_device" in completed.stdout


def cpu_description() -> tuple[str | None, set[str]]:
    """The CPU's model name and feature flags from ``/proc/cpuinfo``; (None, empty set) where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():  # x86, arm64 boards, others
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, flags


def usable_cpus() -> int:
    """Logical CPUs this process may run on (affinity / cgroup cpusets respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads() -> int:
    """All physical cores this process may use: the thread count the runners and the bench use by default."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    logical = psutil.cpu_count(logical=True) or physical
    # With SMT, usable logical CPUs map to about usable * physical / logical cores.
    return max(1, min(physical, round(usable_cpus() * physical / logical)))
