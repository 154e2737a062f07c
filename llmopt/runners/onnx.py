"""Run ONNX artifacts with onnxruntime-genai's native loop.

The graph's batch dimension is pinned, so every call feeds exactly ``batch_size`` rows. Rows are
right-padded: onnxruntime-genai masks the trailing pad tokens of each row and GroupQueryAttention
tracks each row's own length, so every row decodes at its own positions. The pad id is overlaid
to -1 at load (the artifact keeps the model's own): onnxruntime-genai treats every trailing pad
id as padding, and a prompt may well end with the model's pad id (often its end-of-sequence
token); -1 never ends a prompt and gathers a harmless embedding row under the mask. End tokens
are llmopt's business too: onnxruntime-genai is told of none, so rows stop where ``generate`` says.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from llmopt._deps import require
from llmopt.errors import ArtifactError, MissingDependencyError, PromptTooLongError
from llmopt.gpu import require_gpu
from llmopt.hardware import default_threads
from llmopt.runners.base import BatchOutput, Runner, SamplingConfig, SequenceOutput, TokenCallback

PAD_ID = -1
# The recipe's GPU providers and onnxruntime-genai's names for them.
OG_PROVIDERS = {"cuda": "cuda"}
GPU_HINT = "pip install 'llmopt[gpu]' (onnxruntime-gpu and onnxruntime-genai-cuda) on a machine with an NVIDIA GPU"


class OnnxRunner(Runner):
    target = "onnx"
    extra = "onnx"
    backend_distributions = ("onnxruntime-genai",)
    runtime_name = "onnxruntime-genai"

    def __init__(self, path: Path, batch_size: int, sequence_length: int, manifest=None, threads: int | None = None):
        super().__init__(path, batch_size, sequence_length, manifest)
        self.og = require("onnxruntime_genai", extra="onnx", package="onnxruntime-genai")
        # onnxruntime-genai left to itself decodes SmolLM2 int4 at the speed of one thread on 2 cores
        # (72 tok/s); its session told the physical core count decodes at 88 tok/s (measured here).
        self.threads = threads or default_threads()
        runtime = manifest.runtime if manifest else {}
        self.provider = runtime.get("provider", "cpu")
        # "last token": the lm_head projects each row's last position only (llmopt.exporters.onnx).
        self.last_token_logits = runtime.get("logits") == "last token"
        self.model = self._open_model()
        self._idle_generator = None  # see _greedy_generator
        self.vocab_size = int(json.loads((self.path / "genai_config.json").read_text())["model"]["vocab_size"])

    def _open_model(self):
        og = self.og
        if self.provider != "cpu" and self.provider not in OG_PROVIDERS:
            raise ArtifactError(f"artifact '{self.path}': provider '{self.provider}' is not supported by onnxruntime-genai")
        if self.provider == "cuda":
            # No silent CPU fallback, and no trust in what cannot tell: og.is_cuda_available() says how the
            # package was built and Model.device_type echoes the configured provider, so the GPU itself is
            # checked first; a CUDA library that is missing then makes og.Model throw (caught below).
            require_gpu(self.path, self.provider, GPU_HINT)
            if not og.is_cuda_available():
                raise MissingDependencyError(
                    f"artifact '{self.path}' runs on provider cuda, and this onnxruntime-genai build has no CUDA",
                    hint=GPU_HINT,
                )
        return self._model_with()

    def _model_with(self, session_options: dict | None = None):
        """og.Model of the artifact with llmopt's overlay (and extra decoder session options)."""
        og = self.og
        config = og.Config(str(self.path))
        config.clear_providers()
        if self.provider in OG_PROVIDERS:
            config.append_provider(OG_PROVIDERS[self.provider])
        # llmopt decides where rows stop (eos_token_ids may change after load); onnxruntime-genai, told of
        # no end token, never swaps a row's tokens for pads.
        # A single id, not a list: onnxruntime-genai 0.11 ignores a list overlay over a number in the file.
        overlay: dict = {"model": {"pad_token_id": PAD_ID, "eos_token_id": PAD_ID}}
        overlay["model"]["decoder"] = {"session_options": {"intra_op_num_threads": self.threads, **(session_options or {})}}
        config.overlay(json.dumps(overlay))
        try:
            return og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises a bare RuntimeError when the provider cannot load
            if self.provider == "cpu":
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"artifact '{self.path}': onnxruntime-genai cannot open it on provider "
                                f"{self.provider}: {reason}", hint=GPU_HINT) from exc

    # -- generation -----------------------------------------------------------------------------

    def _generator(self, sampling: SamplingConfig | None = None, model=None):
        og = self.og
        model = model or self.model
        options = dict(max_length=self.sequence_length, batch_size=self.batch_size, do_sample=False)
        if sampling is not None and not sampling.greedy:
            options.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                           top_p=sampling.top_p, random_seed=sampling.seed)
        params = og.GeneratorParams(model)
        params.set_search_options(**options)
        return og.Generator(model, params)

    def _greedy_generator(self):
        """The greedy generator, reused across calls: rewound to an empty sequence, its key/value buffers
        (allocated at sequence_length) stay allocated, as a server's would (13 ms of SmolLM2's TTFT).
        A sampling generator is made per call: its random state starts from the seed each time."""
        generator, self._idle_generator = self._idle_generator, None
        if generator is None:
            return self._generator()
        generator.rewind_to(0)
        return generator

    def _release(self, generator, greedy: bool) -> None:
        if greedy and self.model is not None:
            self._idle_generator = generator

    def _input_ids(self, batch: list[list[int]]) -> np.ndarray:
        """The rows right-padded with PAD_ID to the longest: [batch_size, width] int32."""
        input_ids = np.full((self.batch_size, max(len(ids) for ids in batch)), PAD_ID, dtype=np.int32)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = ids
        return input_ids

    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        self.check_batch(batch)
        input_ids = self._input_ids(batch)
        max_new_tokens = min(sampling.max_new_tokens, self.sequence_length - input_ids.shape[1])
        penalize = sampling.repetition_penalty != 1.0
        seen = [list(ids) for ids in batch]  # for the repetition penalty: each row's prompt and output, no pads

        started = time.perf_counter()
        generator = self._greedy_generator() if sampling.greedy else self._generator(sampling)
        generator.append_tokens(input_ids)
        outputs: list[list[int]] = [[] for _ in batch]
        finished = [False] * self.batch_size
        first_token_at = None
        for _ in range(max_new_tokens):
            if penalize:
                generator.set_logits(apply_repetition_penalty(generator.get_logits(), seen, sampling.repetition_penalty))
            generator.generate_next_token()
            tokens = generator.get_next_tokens().tolist()
            if first_token_at is None:
                first_token_at = time.perf_counter()
            for row, token in enumerate(tokens):
                if finished[row]:
                    continue
                outputs[row].append(token)
                seen[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                finished[row] = token in self.eos_token_ids
            if all(finished) or generator.is_done():
                break
        done_at = time.perf_counter()
        first_token_at = first_token_at or done_at
        self._release(generator, sampling.greedy)
        return BatchOutput(
            sequences=[SequenceOutput(tokens, "stop" if ended else "length") for tokens, ended in zip(outputs, finished)],
            ttft_s=first_token_at - started,
            decode_s=done_at - first_token_at,
        )

    def profile(self, batch: list[list[int]], new_tokens: int) -> dict:
        """onnxruntime's session profiling, switched on in onnxruntime-genai's decoder session options."""
        from llmopt import profiling

        self.check_batch(batch)
        with tempfile.TemporaryDirectory(prefix="llmopt-profile-") as scratch:
            model = self._model_with({"enable_profiling": str(Path(scratch) / "onnxruntime")})
            generator = self._generator(model=model)
            input_ids = self._input_ids(batch)
            steps = min(new_tokens, self.sequence_length - input_ids.shape[1])
            started = time.perf_counter()
            generator.append_tokens(input_ids)
            generator.generate_next_token()  # the prefill runs here
            first = time.perf_counter()
            for _ in range(steps - 1):
                generator.generate_next_token()
            done = time.perf_counter()
            del generator, model  # onnxruntime writes the trace when the session ends
            trace = next(Path(scratch).glob("onnxruntime*.json"))
            records = profiling.from_onnxruntime_trace(trace)
        return profiling.summarize(records, {"prefill": (first - started) * 1000, "decode": (done - first) * 1000},
                                   steps - 1)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        if len(token_ids) > self.sequence_length:
            raise PromptTooLongError(
                f"{len(token_ids)} tokens do not fit the artifact's sequence_length {self.sequence_length}"
            )
        generator = self._greedy_generator()
        # The batch dimension is pinned: feed batch_size copies and read the first row.
        if not self.last_token_logits:
            generator.append_tokens(np.array([token_ids] * self.batch_size, dtype=np.int32))
            logits = np.asarray(generator.get_output("logits")[0], dtype=np.float32)
        else:  # the graph projects the last position only: teacher-forced one token at a time
            logits = np.stack(list(self._forced_logits(generator, token_ids)))
        self._release(generator, greedy=True)
        return logits[:, : self.vocab_size]

    def _forced_logits(self, generator, token_ids: list[int]):
        """Each position's logits, the next token forced by greedy search on logits that allow only it
        (onnxruntime-genai appends tokens once per generator when the batch has more than one row)."""
        generator.append_tokens(np.full((self.batch_size, 1), token_ids[0], dtype=np.int32))
        yield np.array(generator.get_logits(), dtype=np.float32)[0, -1]
        forced = np.empty((self.batch_size, 1, self.vocab_size), dtype=np.float32)
        for token in token_ids[1:]:
            forced.fill(np.finfo(np.float32).min)
            forced[..., token] = 0.0
            generator.set_logits(forced)
            generator.generate_next_token()
            yield np.array(generator.get_logits(), dtype=np.float32)[0, -1]

    def close(self) -> None:
        self._idle_generator = None
        self.model = None


def apply_repetition_penalty(logits: np.ndarray, seen: list[list[int]], penalty: float) -> np.ndarray:
    """transformers' rule on each row's prompt and output tokens (onnxruntime-genai's would see the pads)."""
    logits = np.array(logits, dtype=np.float32)  # [batch, 1, vocab]
    for row, ids in enumerate(seen):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        scores = logits[row, -1, ids]
        logits[row, -1, ids] = np.where(scores < 0, scores * penalty, scores / penalty)
    return logits
