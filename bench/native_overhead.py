#!/usr/bin/env python3
"""What llmopt's own layers cost: ``llmopt run``'s path against the runtime's bare loop, same artifact.

For each artifact, in one process, interleaved repetitions of the same greedy generation:

* ``generate``: ``llmopt.generation.generate`` on the prompt text (what ``llmopt run`` does:
  tokenize, chat template, batch, runner, detokenize),
* ``runner``: the artifact's runner on the token ids,
* ``native``: openvino-genai ``LLMPipeline.generate`` on the token ids (OpenVINO artifacts), or the
  onnxruntime-genai generator loop (ONNX artifacts), opened with the artifact's own options.

Prints the median end-to-end time of each and the ratios to native; each must be within 5 %
(exit 1 otherwise). Greedy, end-of-sequence honoured on every side, so all three generate the
same tokens (checked). Static-shape artifacts have no native loop and are skipped.

    python bench/native_overhead.py out/smol-onnx out/smol-ov [-r 7] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing llmopt

import numpy as np  # noqa: E402

from llmopt import api, artifact, generation  # noqa: E402
from llmopt.benchmark import prompts  # noqa: E402
from llmopt.runners.base import SamplingConfig  # noqa: E402

TOLERANCE = 1.05


class NativeOpenVINO:
    def __init__(self, path: Path, manifest):
        import openvino as ov
        import openvino_genai as genai

        self.ov, self.genai = ov, genai
        runtime = manifest.runtime
        properties = dict(runtime.get("ov_config") or {})
        if str(properties.get("ATTENTION_BACKEND", "PA")).upper() != "SDPA":
            scheduler = genai.SchedulerConfig()
            for name, value in (runtime.get("scheduler_config") or {"enable_prefix_caching": False}).items():
                setattr(scheduler, name, value)
            properties["scheduler_config"] = scheduler
        self.pipeline = genai.LLMPipeline(str(path), runtime.get("device", "CPU"), **properties)

    def generate(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        ids = np.array(batch, dtype=np.int64)  # rows of equal length: no padding needed
        inputs = self.genai.TokenizedInputs(self.ov.Tensor(ids), self.ov.Tensor(np.ones_like(ids)))
        config = self.pipeline.get_generation_config()
        config.max_new_tokens = max_new_tokens
        config.do_sample = False
        return [list(tokens) for tokens in self.pipeline.generate(inputs, config).tokens]


class NativeOnnx:
    def __init__(self, path: Path, manifest):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(path))
        self.batch_size, self.max_length = manifest.batch_size, manifest.sequence_length

    def generate(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, batch_size=self.batch_size, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array(batch, dtype=np.int32))
        outputs: list[list[int]] = [[] for _ in batch]
        while not generator.is_done() and len(outputs[0]) < max_new_tokens:
            generator.generate_next_token()
            for row, token in enumerate(generator.get_next_tokens().tolist()):
                outputs[row].append(int(token))
        return outputs


NATIVE = {"openvino": NativeOpenVINO, "onnx": NativeOnnx}


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


def measure(path: Path, repetitions: int, new_tokens: int) -> dict:
    manifest = artifact.load(path)
    if manifest.static or manifest.target not in NATIVE:
        return {"artifact": str(path), "skipped": f"no bare native loop for target {manifest.target}"
                + (" (static shapes)" if manifest.static else "")}
    runner = api.open_runner(path, verify=False)
    native = NATIVE[manifest.target](path, manifest)
    new_tokens = min(new_tokens, manifest.sequence_length // 2)
    text = prompts.grounded_text(runner.tokenizer, manifest.sequence_length - new_tokens)
    ids = generation.encode_prompt(runner.tokenizer, text, chat=True)
    batch = [ids] * manifest.batch_size
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    eos = runner.eos_token_ids

    paths = {
        "generate": lambda: generation.generate(runner, [text] * manifest.batch_size, sampling, chat=True)[0].token_ids,
        "runner": lambda: runner.generate(batch, sampling).sequences[0].token_ids,
        "native": lambda: _cut(native.generate(batch, new_tokens)[0], eos),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, list[int]] = {}
    for name, call in paths.items():  # warmup, and the tokens each path generates
        tokens[name] = call()
    order = list(paths)
    for repetition in range(repetitions):
        for name in order[repetition % 3:] + order[: repetition % 3]:  # rotate: no path always runs first
            started = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - started)
    runner.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"artifact": str(path), "target": manifest.target, "batch_size": manifest.batch_size,
              "input_length": len(ids), "new_tokens": len(tokens["native"]),
              "median_ms": {name: round(value * 1000, 3) for name, value in medians.items()},
              "ratio_to_native": {name: round(medians[name] / medians["native"], 4) for name in ("generate", "runner")},
              "same_tokens": tokens["generate"] == tokens["runner"] == tokens["native"]}
    result["ok"] = all(ratio <= TOLERANCE for ratio in result["ratio_to_native"].values()) and result["same_tokens"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("-r", "--repetitions", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    failed = False
    for path in args.artifacts:
        result = measure(path, args.repetitions, args.new_tokens)
        if args.json:
            print(json.dumps(result))
        elif "skipped" in result:
            print(f"{path}: skipped: {result['skipped']}")
        else:
            times = ", ".join(f"{name} {value:.1f} ms" for name, value in result["median_ms"].items())
            ratios = ", ".join(f"{name}/native {value:.3f}" for name, value in result["ratio_to_native"].items())
            verdict = "ok" if result["ok"] else f"FAIL (limit {TOLERANCE:.2f}" + (
                ", tokens differ" if not result["same_tokens"] else "") + ")"
            print(f"{path} ({result['target']}, {result['input_length']} in, {result['new_tokens']} new): "
                  f"{times}; {ratios}: {verdict}")
        failed |= "skipped" not in result and not result["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
