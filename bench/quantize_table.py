#!/usr/bin/env python3
"""Every quantized variant on both targets against its fp32 artifact, from one run.

For each variant (a recipe, built at batch sizes 1 and 4 with ``llmopt.api``): top-1 agreement,
mean KL and perplexity against PyTorch fp32 (teacher-forced on llmopt/data/validation.txt, from
the build's own validation), decode tokens/s and TTFT (``llmopt.benchmark``: 128-token prompt,
128 new tokens, each artifact in its own process), size, and the ratios to the fp32 artifact of
the same target and batch size, checked against the goals:

    int4: agreement >= 0.80, decode >= 2.5x fp32, size <= 0.35x fp32, TTFT <= 1.0x fp32
    int8: agreement >= 0.90, decode >= 1.4x fp32

Variants: the openvino recipes in configs/ (fp32, int8, int4 HQQ), NNCF int4 variants given as
overrides (AWQ + scale estimation; plain round-to-nearest, the degenerate reference), and the
onnx fp32 recipe with every configs/smollm2-onnx-int*.yaml. Artifacts go to out/quantize-table/
and are reused when their recipe has not changed (and come from the compile cache when it has
them), so a rerun only measures.

    python bench/quantize_table.py [--batch-sizes 1,4] [--only ov-int4,ov-fp32] [--repetitions 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "configs"
OUT = ROOT / "out" / "quantize-table"
GOALS = {
    "int4": {"top1_agreement": 0.80, "decode_ratio": 2.5, "size_ratio": 0.35, "ttft_ratio": 1.0},
    "int8": {"top1_agreement": 0.90, "decode_ratio": 1.4},
}
# Every variant is built and measured, whatever its accuracy: the table reports it.
NO_THRESHOLDS = {"validation.min_top1_agreement": 0.0, "validation.max_mean_kl": 1e9}


def variants() -> dict[str, tuple[Path, dict]]:
    """name -> (recipe file, overrides). The fp32 variant of each target is named '<target>-fp32'."""
    table = {
        "ov-fp32": (CONFIGS / "smollm2-openvino.yaml", {}),
        "ov-int8": (CONFIGS / "smollm2-openvino-int8.yaml", {}),
        "ov-int4": (CONFIGS / "smollm2-openvino-int4.yaml", {}),
        "ov-int4-awq-g64": (CONFIGS / "smollm2-openvino.yaml", {
            "quantization.weight_format": "int4", "quantization.algorithm": "awq", "quantization.group_size": 64}),
        "ov-int4-rtn-g64": (CONFIGS / "smollm2-openvino.yaml", {
            "quantization.weight_format": "int4", "quantization.algorithm": "rtn", "quantization.group_size": 64}),
        "onnx-fp32": (CONFIGS / "smollm2-onnx.yaml", {}),
    }
    for path in sorted(CONFIGS.glob("smollm2-onnx-int*.yaml")):
        table["onnx-" + path.stem.removeprefix("smollm2-onnx-")] = (path, {})
    return table


def log(message: str) -> None:
    print(f"quantize_table: {message}", file=sys.stderr, flush=True)


def build(name: str, config: Path, overrides: dict, batch_size: int) -> Path:
    """The artifact of one variant at one batch size: reused when its recipe is unchanged."""
    from llmopt import api, artifact, cache, recipe

    wanted = recipe.resolve(config, {**overrides, **NO_THRESHOLDS, "shapes.batch_size": batch_size})
    output = OUT / f"{name}-b{batch_size}"
    if (output / artifact.MANIFEST_NAME).is_file():
        if artifact.read_manifest(output).recipe == wanted.to_dict():
            return output
    log(f"building {output.name}")
    if wanted.quantization.enabled:
        api.quantize(output, recipe=wanted, force=True, cache_dir=cache.default_dir())
    else:
        api.export(wanted, output, force=True, cache_dir=cache.default_dir())
    return output


def measure_speed(paths: list[Path], batch_sizes: list[int], args) -> dict[tuple[str, int], dict]:
    """(artifact path, batch size) -> the llmopt.benchmark row of the 128/128 case."""
    from llmopt.benchmark import BenchConfig, run

    config = BenchConfig(artifacts=[str(path) for path in paths], input_lengths=[args.input_length],
                         new_tokens=args.new_tokens, batch_sizes=batch_sizes, repetitions=args.repetitions,
                         warmup=1, threads=args.threads)
    result = run(config)
    rows = {}
    for row in result.rows:
        if row["status"] == "ok":
            rows[(row["subject"], row["batch_size"])] = row
        elif row["status"] == "error":
            log(f"{row['subject']} batch {row['batch_size']}: {row.get('note')}")
    return rows


def table_rows(built: dict[tuple[str, int], Path], speed: dict) -> list[dict]:
    from llmopt import api, artifact

    rows = []
    for (name, batch_size), path in built.items():
        manifest = artifact.read_manifest(path)
        metrics = manifest.validation or {}
        bench = speed.get((str(path), batch_size), {})
        rows.append({
            "variant": name, "target": manifest.target, "batch_size": batch_size,
            "weights": (manifest.quantization or {}).get("weight_format", "none"),
            "method": (manifest.runtime.get("quantization") or {}).get("method"),
            "top1_agreement": metrics.get("top1_agreement"), "mean_kl": metrics.get("mean_kl"),
            "perplexity": metrics.get("perplexity"), "reference_perplexity": metrics.get("reference_perplexity"),
            "decode_tok_s": bench.get("decode_tok_s"), "ttft_ms": bench.get("ttft_ms"),
            "size_mb": round(api.directory_size(path) / 1e6, 1), "path": str(path),
        })
    baselines = {(row["target"], row["batch_size"]): row for row in rows if row["variant"].endswith("-fp32")}
    for row in rows:
        base = baselines.get((row["target"], row["batch_size"]))
        row["decode_ratio"] = _ratio(row["decode_tok_s"], base and base["decode_tok_s"])
        row["ttft_ratio"] = _ratio(row["ttft_ms"], base and base["ttft_ms"])
        row["size_ratio"] = _ratio(row["size_mb"], base and base["size_mb"])
        row["goals"] = goal_check(row)
    return rows


def _ratio(value, reference):
    return round(value / reference, 3) if value is not None and reference else None


def goal_check(row: dict) -> str:
    goals = GOALS.get(row["weights"])
    if not goals:
        return ""
    missed = []
    for key, bound in goals.items():
        value = row.get(key)
        if value is None:
            missed.append(f"{key}=?")
        elif (key in ("size_ratio", "ttft_ratio") and value > bound) or (key not in ("size_ratio", "ttft_ratio") and value < bound):
            missed.append(f"{key} {value} vs {bound}")
    return "all met" if not missed else "missed: " + "; ".join(missed)


def print_table(rows: list[dict]) -> None:
    columns = [("variant", "{}"), ("batch_size", "{}"), ("weights", "{}"), ("top1_agreement", "{:.3f}"),
               ("mean_kl", "{:.4f}"), ("perplexity", "{:.2f}"), ("decode_tok_s", "{:.1f}"), ("decode_ratio", "{:.2f}x"),
               ("ttft_ms", "{:.1f}"), ("ttft_ratio", "{:.2f}x"), ("size_mb", "{:.1f}"), ("size_ratio", "{:.2f}x"),
               ("goals", "{}")]
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append([pattern.format(row[name]) if row.get(name) is not None else "-" for name, pattern in columns])
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    reference = next((row["reference_perplexity"] for row in rows if row.get("reference_perplexity")), None)
    if reference:
        print(f"\nPyTorch fp32 perplexity on the validation text: {reference:.2f}; agreement and KL are against it.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--only", default=None, help="comma-separated variant names (the fp32 ones are always added)")
    parser.add_argument("--input-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)

    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    chosen = variants()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(chosen)
        if unknown:
            parser.error(f"unknown variants {', '.join(sorted(unknown))}; known: {', '.join(chosen)}")
        targets = {"ov" if name.startswith("ov-") else "onnx" for name in wanted}
        wanted |= {f"{target}-fp32" for target in targets}
        chosen = {name: value for name, value in chosen.items() if name in wanted}
    built: dict[tuple[str, int], Path] = {}
    for name, (config, overrides) in chosen.items():
        for batch_size in batch_sizes:
            try:
                built[(name, batch_size)] = build(name, config, overrides, batch_size)
            except Exception as exc:  # one variant that cannot be built does not lose the others
                log(f"{name} batch {batch_size}: not built: {type(exc).__name__}: {exc}")
    speed = measure_speed(sorted(set(built.values())), batch_sizes, args)
    rows = table_rows(built, speed)
    print_table(rows)
    if args.json_path:
        Path(args.json_path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
