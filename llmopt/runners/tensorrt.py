"""Run a TensorRT-LLM engine artifact with the ``LLM`` API of the release that built it.

Before anything imports tensorrt_llm, ``check_engine_compatible`` compares the manifest with this
machine: a GPU must be present (its own error), its architecture (SM) must be the one the engine
was built for, and the installed tensorrt_llm / TensorRT must be the exact versions that built it.
TensorRT engines are not portable across either, and loading one anyway fails deep in C++.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from llmopt import artifact
from llmopt._deps import install_hint
from llmopt.artifact import Manifest
from llmopt.errors import ArtifactError, MissingDependencyError, PromptTooLongError
from llmopt.gpu import check_compiled_for_this_gpu
from llmopt.hardware import DetectedGpu
from llmopt.runners.base import BatchOutput, Runner, SamplingConfig, SequenceOutput, TokenCallback

ENGINE_DIR = "engine"  # where older manifests without runtime.engine_dir keep the engine
ENGINE_VERSIONS = ("tensorrt_llm", "tensorrt")  # the distributions an engine is tied to, exactly


def check_engine_compatible(path: Path, manifest: Manifest, gpus: list[DetectedGpu] | None = None,
                            installed: dict[str, str | None] | None = None) -> DetectedGpu:
    """Refuse, with the reason, an engine this machine cannot run. Imports no NVIDIA library."""
    return check_compiled_for_this_gpu(path, manifest.runtime or {}, extra="tensorrt", tied_to=ENGINE_VERSIONS,
                                       gpus=gpus, installed=installed)


def sampling_options(sampling: SamplingConfig, prompt_length: int, max_seq_len: int, end_id: int | None,
                     pad_id: int | None, **extra) -> dict:
    """``SamplingParams`` keywords for one request. Pure, so the keywords are checked against the release.

    TensorRT-LLM rejects a request whose prompt plus ``max_tokens`` exceeds the engine's
    ``max_seq_len``; like every other runner, generation stops at the artifact's length instead.
    """
    options = dict(max_tokens=max(1, min(sampling.max_new_tokens, max_seq_len - prompt_length)),
                   end_id=end_id, pad_id=pad_id, repetition_penalty=sampling.repetition_penalty, **extra)
    if sampling.greedy:
        options.update(top_k=1)
    else:
        options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed)
    return options


class TensorRTRunner(Runner):
    target = "tensorrt"
    extra = "tensorrt"
    backend_distributions = ("tensorrt_llm",)
    runtime_name = "TensorRT-LLM"

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, **options) -> "TensorRTRunner":
        path = Path(path)
        manifest = artifact.read_manifest(path)
        if manifest.target != cls.target:
            raise ArtifactError(f"artifact '{path}' is a {manifest.target} artifact, not a tensorrt one")
        check_engine_compatible(path, manifest)  # before tensorrt_llm is imported
        return super().load(path, verify=verify, **options)

    def __init__(self, path: Path, batch_size: int, sequence_length: int, manifest: Manifest | None = None):
        super().__init__(path, batch_size, sequence_length, manifest)
        try:
            from tensorrt_llm import SamplingParams
            from tensorrt_llm._tensorrt_engine import LLM  # the engine backend (TensorRT-LLM 1.0 - 1.2)
        except ImportError as exc:
            raise MissingDependencyError(
                f"the 'tensorrt' target needs tensorrt_llm, which is not installed ({exc.name})",
                hint=f"install it with: {install_hint('tensorrt')}",
            ) from exc
        runtime = (manifest.runtime if manifest else {}) or {}
        self.SamplingParams = SamplingParams
        build_config = runtime.get("build_config") or {}
        self.gather_context_logits = bool(build_config.get("gather_context_logits"))
        self.max_seq_len = int(build_config.get("max_seq_len") or sequence_length)
        self.max_input_len = int(build_config.get("max_input_len") or self.max_seq_len - 1)
        engine_dir = self.path / runtime.get("engine_dir", ENGINE_DIR)
        self.llm = LLM(
            model=str(engine_dir),
            skip_tokenizer_init=True,  # llmopt tokenizes; the engine sees token ids
            tensor_parallel_size=int(runtime.get("tensor_parallel_size", 1)),
        )
        self.end_id = min(self.eos_token_ids) if self.eos_token_ids else None
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_id

    def _params(self, sampling: SamplingConfig, prompt: list[int], **extra):
        if len(prompt) > self.max_input_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens but the engine accepts at most {self.max_input_len} (max_input_len)",
                hint="re-export with a larger --sequence-length, or shorten the prompt",
            )
        return self.SamplingParams(**sampling_options(sampling, len(prompt), self.max_seq_len, self.end_id,
                                                      self.pad_id, **extra))

    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        params = [self._params(sampling, ids) for ids in batch]
        started = time.perf_counter()
        first: float | None = None
        sequences = []
        if on_token is None:
            outputs = self.llm.generate(batch, params, use_tqdm=False)
            first = time.perf_counter()  # no streaming: ttft is the whole call (reported as such)
            for output in outputs:
                completion = output.outputs[0]
                sequences.append(self._sequence(list(completion.token_ids), completion.finish_reason, sampling))
        else:
            requests = [self.llm.generate_async(ids, row_params, streaming=True) for ids, row_params in zip(batch, params)]
            for row, request in enumerate(requests):
                seen = 0
                for partial in request:  # each step of a streaming request
                    tokens = partial.outputs[0].token_ids
                    if len(tokens) > seen and first is None:
                        first = time.perf_counter()
                    for token in tokens[seen:]:
                        on_token(row, int(token))
                    seen = len(tokens)
                completion = request.outputs[0]
                sequences.append(self._sequence(list(completion.token_ids), completion.finish_reason, sampling))
        finished = time.perf_counter()
        first = first or finished
        return BatchOutput(sequences=sequences, ttft_s=first - started, decode_s=finished - first)

    def _sequence(self, tokens: list[int], reason, sampling: SamplingConfig) -> SequenceOutput:
        for index, token in enumerate(tokens):
            if token in self.eos_token_ids:
                return SequenceOutput(tokens[: index + 1], "stop")
        return SequenceOutput(tokens[: sampling.max_new_tokens], "stop" if str(reason) == "stop" else "length")

    def logits(self, token_ids: list[int]) -> np.ndarray:
        if not self.gather_context_logits:
            raise ArtifactError(
                f"artifact '{self.path}' was built without prompt logits, which teacher-forced validation needs",
                hint="re-export with tensorrt.gather_context_logits: true",
            )
        params = self._params(SamplingConfig(max_new_tokens=1), token_ids, return_context_logits=True)
        output = self.llm.generate([token_ids], params, use_tqdm=False)[0]
        logits = output.context_logits
        if hasattr(logits, "float"):
            logits = logits.float().cpu().numpy()
        return np.asarray(logits, dtype=np.float32)[: len(token_ids)]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
            self.llm = None
