"""Where a generation's time goes, from the runtime's own profiler: per operator type and per layer role.

The runners record one greedy generation with their runtime's profiler on (``Runner.profile``):
onnxruntime's session profiling (a Chrome-trace JSON with one ``*_kernel_time`` event per node run,
``model_run`` per session run) and OpenVINO's performance counters (``PERF_COUNT``: one
``ProfilingInfo`` per executed node of each inference). Both become ``OpRecord``s, which
``summarize`` adds up per phase (prefill, decode), per operator type and per layer role, and sets
against the wall time of the same generation: what the operators do not account for is the host
loop (scheduling, sampling, copies, the runtime's own overhead).

Roles come from node names, which the exporters derive from the checkpoint's module names
(``/model/layers.0/attn/qkv_proj/MatMulNBits``, ``__module.model.layers.3.mlp.down_proj/...``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PHASES = ("prefill", "decode")
# First match wins: the lm_head before the projections, attention before the norms inside it.
ROLE_PATTERNS = (
    ("lm_head", re.compile(r"lm_head|output_layer|^logits$", re.I)),  # "logits": the static IR names it by its output
    ("embedding", re.compile(r"embed", re.I)),
    ("attention", re.compile(r"attn|attention|rotary|rope|[qkvo]_proj|qkv|sdpa|scaled_dot|past_key|present", re.I)),
    ("mlp", re.compile(r"mlp|gate_proj|up_proj|down_proj|fc1|fc2|ffn|feed_forward", re.I)),
    ("norm", re.compile(r"norm", re.I)),
)
ROLES = (*(role for role, _ in ROLE_PATTERNS), "other")


@dataclass(frozen=True)
class OpRecord:
    phase: str  # prefill or decode
    name: str  # the node's name in the graph
    op_type: str
    ms: float


def role_of(name: str) -> str:
    for role, pattern in ROLE_PATTERNS:
        if pattern.search(name):
            return role
    return "other"


def from_onnxruntime_trace(path: str | Path, phase: str | None = None) -> list[OpRecord]:
    """Kernel times from an onnxruntime profile. ``phase`` None: the first session run is the prefill,
    the others decode steps (one session serves both); otherwise every run belongs to ``phase``."""
    events = json.loads(Path(path).read_text(encoding="utf-8"))
    runs = sorted((event["ts"], event["ts"] + event["dur"]) for event in events if event.get("name") == "model_run")
    first_run_end = runs[0][1] if runs else float("inf")
    records = []
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        which = phase or ("prefill" if event["ts"] < first_run_end else "decode")
        records.append(OpRecord(which, event["name"][: -len("_kernel_time")], event["args"].get("op_name", "?"),
                                event["dur"] / 1000.0))
    return records


def from_openvino_counters(infos: Iterable, phase: str) -> list[OpRecord]:
    """One inference's OpenVINO performance counters (``InferRequest.get_profiling_info()``)."""
    records = []
    for info in infos:
        if str(info.status).endswith("EXECUTED"):  # not NOT_RUN or OPTIMIZED_OUT
            records.append(OpRecord(phase, info.node_name, info.node_type, info.real_time.total_seconds() * 1000.0))
    return records


def summarize(records: list[OpRecord], wall_ms: dict[str, float], decode_steps: int) -> dict:
    """Per phase: wall and operator time, the host's share, and operator time by role and by type.

    Decode figures are per generated token (per step of the whole batch); prefill figures are for the
    one prefill. ``wall_ms`` holds each phase's wall time of the same profiled generation.
    """
    summary: dict = {}
    for phase in PHASES:
        chosen = [record for record in records if record.phase == phase]
        scale = 1.0 / max(decode_steps, 1) if phase == "decode" else 1.0
        by_role: dict[str, float] = defaultdict(float)
        by_type: dict[str, float] = defaultdict(float)
        for record in chosen:
            by_role[role_of(record.name)] += record.ms * scale
            by_type[record.op_type] += record.ms * scale
        operator_ms = sum(by_role.values())
        wall = wall_ms.get(phase, 0.0) * scale
        summary[phase] = {
            "wall_ms": round(wall, 3),
            "operator_ms": round(operator_ms, 3),
            "host_ms": round(max(wall - operator_ms, 0.0), 3),
            "by_role": {role: round(by_role[role], 3) for role in ROLES if by_role.get(role)},
            "by_op_type": {name: round(ms, 3) for name, ms in sorted(by_type.items(), key=lambda item: -item[1])},
        }
    summary["decode_steps"] = decode_steps
    return summary


def summarize_generation(records: list[OpRecord], output) -> dict:
    """``summarize`` for a profiled ``Runner.generate`` call: its own TTFT and decode time as the wall times."""
    steps = max(len(sequence.token_ids) for sequence in output.sequences) - 1
    return summarize(records, {"prefill": output.ttft_s * 1000, "decode": output.decode_s * 1000}, steps)
