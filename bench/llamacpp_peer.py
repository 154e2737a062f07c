#!/usr/bin/env python3
"""llama.cpp as a peer: the same SmolLM2 GGUF, the same synthetic prompts, the same rows as ``llmopt bench``.

Needs llama-cpp-python (``pip install llama-cpp-python``; not part of CI). llama.cpp runs as one
more subject of the bench machinery, in its own worker process, batch 1, greedy, end-of-sequence
ignored, its prompt cache reset before every run (``llm.reset()``), so TTFT is a full prefill:

    python bench/llamacpp_peer.py --baseline pytorch:eager                      # vs the eager baseline
    python bench/llamacpp_peer.py out/smol-onnx out/smol-ov --baseline pytorch:eager --json > peer.jsonl

Prompts are built with the checkpoint's tokenizer (the GGUF holds the same vocabulary), input
lengths are ratios of ``--sequence-length`` (or ``--input-lengths``), as in ``llmopt bench``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing llmopt

from llmopt.runners.base import BatchOutput, SamplingConfig, SequenceOutput  # noqa: E402

DEFAULT_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CHECKPOINT = ROOT / "models" / "SmolLM2-135M-Instruct"


class LlamaCppRunner:
    """The slice of llmopt's runner contract the bench worker uses: generate, eos_token_ids, close."""

    def __init__(self, path: str, batch_size: int, sequence_length: int, threads: int | None = None):
        from llama_cpp import Llama

        if batch_size != 1:
            raise ValueError("llama-cpp-python's Llama runs one sequence at a time (batch size 1)")
        self.batch_size, self.sequence_length = 1, sequence_length
        self.llm = Llama(model_path=str(path), n_ctx=sequence_length, n_batch=min(512, sequence_length),
                         n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.eos_token_ids = {int(self.llm.token_eos())}

    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token=None) -> BatchOutput:
        (prompt,) = batch
        self.llm.reset()  # forget the previous prompt: no prefix reuse, every run prefills in full
        tokens: list[int] = []
        reason = "length"
        started = time.perf_counter()
        first_token_at = None
        # generate() evaluates the prompt, then yields one greedy token per step; stopping here skips
        # the evaluation of the last token, as the other runners do.
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            tokens.append(int(token))
            if on_token is not None:
                on_token(0, int(token))
            if token in self.eos_token_ids:
                reason = "stop"
                break
            if len(tokens) >= sampling.max_new_tokens:
                break
        done_at = time.perf_counter()
        first_token_at = first_token_at or done_at
        return BatchOutput([SequenceOutput(tokens, reason)], ttft_s=first_token_at - started, decode_s=done_at - first_token_at)

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


def open_runner(path: str, batch_size: int, sequence_length: int, threads: int | None = None) -> LlamaCppRunner:
    return LlamaCppRunner(path, batch_size, sequence_length, threads=threads)


def subject(gguf: Path, checkpoint: Path, sequence_length: int = 512):
    """llama.cpp as a bench subject: batch 1, prompts built with the checkpoint's tokenizer."""
    from llmopt.benchmark import suite

    quantization = gguf.stem.rsplit(".", 1)[-1].lower()  # SmolLM2-135M-Instruct.Q4_1 -> q4_1
    return suite.Subject(
        name=f"llama.cpp:{quantization}", kind="peer", path=str(gguf.resolve()), target="llama.cpp",
        sequence_length=sequence_length, batch_size=1, precision=quantization, weights=quantization,
        factory="llamacpp_peer:open_runner", pythonpath=str(HERE), tokenizer=str(checkpoint.resolve()),
        checkpoint=str(checkpoint),
    )


def _numbers(text: str | None, kind):
    return [kind(item) for item in text.split(",") if item.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("artifacts", nargs="*", help="llmopt artifacts to measure in the same run")
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--baseline-model", type=Path, default=DEFAULT_CHECKPOINT,
                        help="HF checkpoint: tokenizer for the prompts, and the PyTorch baseline")
    parser.add_argument("--baseline", action="append", default=[], help="pytorch, pytorch:eager, ... (as llmopt bench)")
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--input-ratios", default="0.25,0.5,0.75")
    parser.add_argument("--input-lengths", default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--format", choices=("table", "json", "csv", "md"), default="table")
    parser.add_argument("--json", action="store_true", help="same as --format json")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows (json, csv or md by suffix)")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("llama_cpp") is None:
        print("llamacpp_peer: llama-cpp-python is not installed (pip install llama-cpp-python); nothing measured",
              file=sys.stderr)
        return 2
    for path, what in ((args.gguf, "GGUF file"), (args.baseline_model, "checkpoint (make model)")):
        if not path.exists():
            print(f"llamacpp_peer: {what} '{path}' not found", file=sys.stderr)
            return 2

    from llmopt.benchmark import BenchConfig, parse_baselines, report, suite

    peer = subject(args.gguf, args.baseline_model, args.sequence_length)
    config = BenchConfig(
        artifacts=args.artifacts, baselines=parse_baselines(args.baseline), baseline_model=str(args.baseline_model),
        input_ratios=_numbers(args.input_ratios, float), input_lengths=_numbers(args.input_lengths, int),
        new_tokens=args.new_tokens, repetitions=args.repetitions, warmup=args.warmup, seed=args.seed,
        threads=args.threads, extra_subjects=[peer],
    )
    result = suite.run(config)
    fmt = "json" if args.json else args.format
    if args.output is not None:
        chosen = {".csv": "csv", ".md": "md"}.get(args.output.suffix.lower(), "json")
        args.output.write_text(report.render(result.rows, result.machine, chosen))
    if fmt == "table":
        report.print_table(result.rows, result.machine, result.notes)
    else:
        sys.stdout.write(report.render(result.rows, result.machine, fmt))
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
