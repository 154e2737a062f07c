#!/usr/bin/env python3
"""Peak memory of ``llmopt export`` (export plus the parity check) over the weights it exports.

Builds once a random-init Llama-shaped checkpoint of about 370M parameters (``--size 1.2b``: 1.17B;
``--size 7b``: Llama-2-7B's shape, 6.88B) (safetensors, stored in
fp32, and cast to fp16 / bf16 for the cases that start from a 16-bit checkpoint; the tokenizer of
models/SmolLM2-135M-Instruct; nothing is downloaded), cached under the paths it prints. Then, for
each case (target, precision, the checkpoint's stored precision: onnx fp32; openvino fp32, fp16,
bf16; openvino fp16 from fp16 and from bf16 checkpoints) runs ``llmopt export`` in a fresh process
per measurement and records:

    seconds     wall time of the export command (process start to exit)
    peak_rss    the kernel's high-water mark of the process (``ru_maxrss`` from ``os.wait4`` on that
                one child, its waited-for children included), plus the sampled peak of the
                process tree's memory (psutil, every 50 ms: RSS, or the summed PSS while it has children)
    weights     parameter count x bytes per element in the recipe's precision (fp32 4, fp16/bf16 2)
    ratio       peak_rss / weights (the goal: at most 2)
    anon_ratio  the sampled peak of the tree's unreclaimable memory (anonymous + shared memory, PSS)
                over weights: what a memory limit cannot take back (clean pages of mapped files it can)
    steps       the sampled peak memory inside each llmopt step (``--log-format json`` events)

Validation thresholds are opened (random weights give near-uniform logits, whose top-1 means
nothing in fp16/bf16); the parity check itself runs in full, which is what is measured.

Before and after in one run: ``--baseline-src`` names another checkout of llmopt (e.g. a
``git worktree`` of main) whose package is imported, via PYTHONPATH, for the "before" rows:

    git worktree add /tmp/llmopt-before main
    python bench/export_memory.py --baseline-src /tmp/llmopt-before [--only onnx-fp32,openvino-fp32]

Whether an export fits a memory limit, as on a CI runner whose container has one: ``--limit 2`` runs
each export in a memory cgroup of twice its weight bytes (this needs permission to create one) and
reports whether it completes or is killed. The kernel reclaims clean pages of mapped files before it
kills, so this is the test of "fits" that peak RSS (which counts those pages) overstates.

Results: a table on stdout and bench/results/export_memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from llmopt.sources import safetensors_header

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKENIZER_SOURCE = ROOT / "models" / "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")
# Llama-shaped, untied embeddings (like the 7B models the goal is about): 369M parameters by default;
# --size 1.2b is TinyLlama-shaped (1.17B), where the libraries' fixed share of the peak is a third as large.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
    "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    "initializer_range": 0.02, "torch_dtype": "float32",
}
SIZES = {"370m": CONFIG, "1.2b": {**CONFIG, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                                  "num_attention_heads": 32, "num_key_value_heads": 4},
         # Llama-2-7B's shape with this tokenizer's 49152-token vocabulary: 6.9B parameters, written tensor by
         # tensor (its fp32 model would not fit this machine), so use it with 16-bit cases and --limit.
         "7b": {**CONFIG, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 4096}}
STREAMED_BUILD = {"7b"}
# case -> (target, recipe precision, precision the checkpoint stores its weights in). Most large
# checkpoints on the Hub are stored in bf16 or fp16, which the -from- cases export.
CASES = {"onnx-fp32": ("onnx", "fp32", "fp32"), "openvino-fp32": ("openvino", "fp32", "fp32"),
         "openvino-fp16": ("openvino", "fp16", "fp32"), "openvino-bf16": ("openvino", "bf16", "fp32"),
         "openvino-fp16-from-fp16": ("openvino", "fp16", "fp16"), "openvino-fp16-from-bf16": ("openvino", "fp16", "bf16")}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
OPEN_THRESHOLDS = ["--set", "validation.min_top1_agreement=0", "--set", "validation.max_mean_kl=1e9"]
GIB = 2**30


def default_checkpoint_dir(size: str = "370m") -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "llmopt" / "bench" / ("export-memory-llama-369m" if size == "370m" else f"export-memory-llama-{size}")


BUILD_SCRIPT = """
import json, sys, torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(**json.loads(sys.argv[2]))
model = transformers.LlamaForCausalLM(config).to(getattr(torch, sys.argv[3]))
model.config.torch_dtype = getattr(torch, sys.argv[3])
model.save_pretrained(sys.argv[1], safe_serialization=True, max_shard_size="20GB")
"""
# The same initialisation as transformers' for Llama (normal(0, 0.02), norms at 1), one tensor at a time into
# shards of 2 GiB, so the model is never whole in memory.
STREAMED_BUILD_SCRIPT = """
import json, sys, pathlib, torch, transformers, accelerate
from safetensors.torch import save_file
torch.manual_seed(0)
out, dtype = pathlib.Path(sys.argv[1]), getattr(torch, sys.argv[3])
config = transformers.LlamaConfig(**json.loads(sys.argv[2]))
config.torch_dtype = dtype
with accelerate.init_empty_weights():
    skeleton = transformers.LlamaForCausalLM(config)
out.mkdir(parents=True)
shard, shard_bytes, weight_map, total, files = {}, 0, {}, 0, 0
def flush():
    global shard, shard_bytes, files
    files += 1
    name = f"model-{files:05d}.safetensors"
    save_file(shard, str(out / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
    shard, shard_bytes = {}, 0
for name, parameter in skeleton.named_parameters():
    tensor = torch.ones(parameter.shape) if name.endswith("norm.weight") else torch.randn(parameter.shape) * 0.02
    shard[name] = tensor.to(dtype)
    shard_bytes += shard[name].numel() * shard[name].element_size()
    total += shard[name].numel() * shard[name].element_size()
    if shard_bytes >= 2 << 30:
        flush()
if shard:
    flush()
index = {"metadata": {"total_size": total}, "weight_map": weight_map}
(out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
config.save_pretrained(out)
transformers.GenerationConfig.from_model_config(config).save_pretrained(out)
"""
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_checkpoint(path: Path, python: str, stored: str = "fp32", config: dict = CONFIG, streamed: bool = False) -> Path:
    """The random-init checkpoint stored in ``stored`` precision (the same weights, seed 0, cast),
    built in a child process (torch never enters this one) and kept."""
    if stored != "fp32":
        path = path.with_name(f"{path.name}-{stored}")
    if (path / "config.json").is_file() and list(path.glob("*.safetensors")):
        return path
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    script = STREAMED_BUILD_SCRIPT if streamed else BUILD_SCRIPT
    subprocess.run([python, "-c", script, str(partial), json.dumps(config), TORCH_DTYPES[stored]], check=True)
    for name in TOKENIZER_FILES:
        if (TOKENIZER_SOURCE / name).is_file():
            shutil.copy2(TOKENIZER_SOURCE / name, partial / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, path)
    return path


def parameter_count(checkpoint: Path) -> int:
    """Parameters in the checkpoint's safetensors files, read from their headers."""
    return sum(math.prod(info["shape"]) for file in checkpoint.glob("*.safetensors")
               for info in safetensors_header(file).values())


class TreeSampler(threading.Thread):
    """Samples the memory of a process and its descendants until stopped, as two series:

    total    the process' RSS alone, or, while it has children, the tree's summed PSS (a forked child
             shares its parent's pages, which a sum of RSS counts twice: OpenVINO's telemetry forks the
             whole exporting process to send one event)
    anon     the tree's summed Pss_Anon + Pss_Shmem (``/proc/PID/smaps_rollup``): the memory the kernel
             cannot take back without swap. The rest of RSS is clean pages of mapped files (the
             checkpoint's safetensors, the IR's .bin, libraries), which it drops under pressure and
             reads again when touched: a cgroup limit (a CI runner's) reclaims them before it kills.
    """

    def __init__(self, pid: int, interval_s: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.root, self.interval_s, self.samples = psutil.Process(pid), interval_s, []
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopped.is_set():
            try:
                children = self.root.children(recursive=True)
                total = self.root.memory_full_info().pss if children else self.root.memory_info().rss
                anon = unreclaimable(self.root.pid)
                for child in children:
                    try:
                        total += child.memory_full_info().pss
                        anon += unreclaimable(child.pid)
                    except (psutil.Error, OSError):
                        pass
            except (psutil.Error, OSError):
                return
            self.samples.append((time.time(), total, anon))
            self.stopped.wait(self.interval_s)


def unreclaimable(pid: int) -> int:
    """Pss_Anon + Pss_Shmem of one process, in bytes."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            name, _, value = line.partition(":")
            if name in ("Pss_Anon", "Pss_Shmem"):
                fields[name] = int(value.split()[0]) * 1024
    return sum(fields.values())


def step_peaks(events: list[dict], samples: list[tuple[float, int, int]]) -> dict[str, dict]:
    """The sampled peak memory (total and unreclaimable) inside each step, and the total at its end."""
    starts = {}
    peaks = {}
    for event in events:
        step = event.get("step")
        if step is None:
            continue
        if event.get("event") == "start":
            starts[step] = event["time"]
        elif event.get("event") in ("end", "fail") and step in starts:
            window = [(total, anon) for at, total, anon in samples if starts[step] <= at <= event["time"]]
            after = [total for at, total, _ in samples if at >= event["time"]]
            peaks[step] = {"seconds": event.get("seconds"), "peak_rss": max((t for t, _ in window), default=0),
                           "peak_anon": max((a for _, a in window), default=0),
                           "rss_at_end": after[0] if after else None}
    return peaks


class MemoryLimit:
    """A memory cgroup (v1 ``memory.limit_in_bytes``, or v2 ``memory.max``) that the export runs in, as a
    CI runner's container would: over the limit the kernel first drops clean pages of mapped files,
    then kills the process (no swap is configured for it)."""

    V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")

    def __init__(self, limit_bytes: int):
        name = f"llmopt-export-memory-{os.getpid()}"
        if (self.V1 / "memory.limit_in_bytes").is_file():
            self.path, self.limit_file, self.events = self.V1 / name, "memory.limit_in_bytes", "memory.oom_control"
        elif (self.V2 / "cgroup.controllers").is_file() and "memory" in (self.V2 / "cgroup.controllers").read_text():
            self.path, self.limit_file, self.events = self.V2 / name, "memory.max", "memory.events"
        else:
            raise SystemExit("--limit needs a memory cgroup this user can create (cgroup v1 or v2 with the memory controller)")
        self.path.mkdir()
        (self.path / self.limit_file).write_text(str(limit_bytes))
        if (self.path / "memory.memsw.limit_in_bytes").is_file():  # swap counts too, where the kernel accounts it
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        if (self.path / "memory.swap.max").is_file():
            (self.path / "memory.swap.max").write_text("0")

    def enter(self) -> None:
        """Run in the child before it execs: join the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        for line in (self.path / self.events).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        self.path.rmdir()


def measure(source: Path, checkpoint: Path, target: str, dtype: str, python: str, workdir: Path,
            validate: bool = True, limit_bytes: int | None = None) -> dict:
    """One ``llmopt export`` in a fresh process, importing llmopt from ``source`` (in a memory cgroup of
    ``limit_bytes``, if given)."""
    output = workdir / f"{target}-{dtype}"
    # -P: the working directory's llmopt must not shadow the one PYTHONPATH names
    command = [python, "-P", "-c", "import sys; from llmopt.cli.main import entry; sys.argv[0] = 'llmopt'; sys.exit(entry())",
               "--log-format", "json", "export", "-m", str(checkpoint), "-t", target, "--dtype", dtype,
               "-o", str(output), "--force", "--no-cache", "--json", *OPEN_THRESHOLDS]
    if not validate:
        command.append("--no-validate")
    env = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LLMOPT_DEBUG", None)
    limit = MemoryLimit(limit_bytes) if limit_bytes else None
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=limit.enter if limit else None)
    sampler = TreeSampler(process.pid)
    sampler.start()
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
    reader.start()
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.stopped.set()
    sampler.join()
    reader.join()
    events = []
    for line in stderr_lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    shutil.rmtree(output, ignore_errors=True)
    sampled = max((total for _, total, _ in sampler.samples), default=0)
    result = {"exit_code": process.returncode, "seconds": round(seconds, 1),
              "peak_rss_bytes": max(usage.ru_maxrss * 1024, sampled), "maxrss_bytes": usage.ru_maxrss * 1024,
              "sampled_tree_peak_bytes": sampled,
              "peak_anon_bytes": max((anon for _, _, anon in sampler.samples), default=0),
              "steps": step_peaks(events, sampler.samples)}
    if limit is not None:
        result.update(limit_bytes=limit_bytes, oom_kills=limit.oom_kills())
        limit.remove()
    if process.returncode != 0:
        result["error"] = "".join(line for line in stderr_lines if not line.startswith("{"))[-2000:] or stdout[-2000:]
    return result


def verdict(row: dict, limit: float | None, separator: str) -> str:
    """Whether the export completed in its memory cgroup, for a row measured with --limit."""
    return f"{separator}under a {limit}x limit: {'completes' if row['fits'] else 'killed'}" if limit else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llmopt-src", type=Path, default=ROOT, help="the checkout measured as 'after' (default: this one)")
    parser.add_argument("--baseline-src", type=Path, help="another checkout measured as 'before', in the same run")
    parser.add_argument("--only", help=f"comma-separated cases among {', '.join(CASES)} (default: all)")
    parser.add_argument("--size", choices=SIZES, default="370m",
                        help="the random checkpoint's shape (default: 370m; 7b needs about 14 GB of disk per stored precision)")
    parser.add_argument("--checkpoint", type=Path, help="where the model is built and kept (default: under ~/.cache/llmopt/bench)")
    parser.add_argument("--no-validate", action="store_true", help="export only, without the parity check")
    parser.add_argument("--limit", type=float, metavar="X",
                        help="run each export in a memory cgroup limited to X times its weight bytes and report "
                             "whether it completes (peaks are then capped by the kernel's reclaim, not measured)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with llmopt's dependencies")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "export_memory.json")
    args = parser.parse_args()
    cases = args.only.split(",") if args.only else list(CASES)
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; accepted: {', '.join(CASES)}")
    checkpoints = {stored: build_checkpoint(args.checkpoint or default_checkpoint_dir(args.size), args.python, stored,
                                            SIZES[args.size], args.size in STREAMED_BUILD)
                   for stored in sorted({CASES[case][2] for case in cases})}
    parameters = parameter_count(checkpoints[min(checkpoints)])
    for stored, checkpoint in checkpoints.items():
        print(f"checkpoint: {checkpoint} ({parameters / 1e6:.0f}M parameters, {stored} safetensors)", file=sys.stderr)
    trees = ([("before", args.baseline_src.resolve())] if args.baseline_src else []) + [("after", args.llmopt_src.resolve())]
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmopt-export-memory-") as scratch:
        for case in cases:
            target, dtype, stored = CASES[case]
            checkpoint = checkpoints[stored]
            weights = parameters * DTYPE_BYTES[dtype]
            for label, source in trees:
                print(f"{case} ({label}, {source}) ...", file=sys.stderr, flush=True)
                result = measure(source, checkpoint, target, dtype, args.python, Path(scratch), not args.no_validate,
                                 int(args.limit * weights) if args.limit else None)
                row = {"case": case, "target": target, "dtype": dtype, "stored": stored, "tree": label, "source": str(source),
                       "parameters": parameters, "weight_bytes": weights,
                       "ratio": round(result["peak_rss_bytes"] / weights, 2),
                       "anon_ratio": round(result["peak_anon_bytes"] / weights, 2), **result}
                rows.append(row)
                if args.limit:
                    row["fits"] = row["exit_code"] == 0 and not row["oom_kills"]
                print(f"  {row['seconds']:.0f} s, peak {row['peak_rss_bytes'] / GIB:.2f} GiB, "
                      f"{row['ratio']:.2f}x weights, unreclaimable {row['anon_ratio']:.2f}x" + verdict(row, args.limit, ", ")
                      + (f", FAILED: {row.get('error', '')[-300:]}" if row["exit_code"] else ""),
                      file=sys.stderr, flush=True)
    print(f"{'case':<15} {'tree':<7} {'seconds':>8} {'weights GiB':>12} {'peak GiB':>9} {'peak/weights':>13}  "
          f"{'unreclaimable GiB':>18} {'unreclaimable/weights':>22}  peak step (total, unreclaimable)")
    for row in rows:
        steps = row["steps"]
        peak_step = max(steps, key=lambda name: steps[name]["peak_rss"]) if steps else "-"
        anon_step = max(steps, key=lambda name: steps[name]["peak_anon"]) if steps else "-"
        print(f"{row['case']:<15} {row['tree']:<7} {row['seconds']:>8.0f} {row['weight_bytes'] / GIB:>12.2f} "
              f"{row['peak_rss_bytes'] / GIB:>9.2f} {row['ratio']:>12.2f}x  {row['peak_anon_bytes'] / GIB:>18.2f} "
              f"{row['anon_ratio']:>21.2f}x  {peak_step}, {anon_step}"
              + verdict(row, args.limit, "  ")
              + ("  (failed)" if row["exit_code"] else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"checkpoints": {stored: str(path) for stored, path in checkpoints.items()},
                                     "parameters": parameters, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any(row["exit_code"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
