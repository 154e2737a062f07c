"""The runner contract every target implements.

A runner works on token ids; tokenization, the chat template, batching and text streaming live
in ``llmopt.generation`` so every target behaves the same. ``generate`` always receives exactly
``batch_size`` rows (the caller pads a short batch) and calls ``on_token(row, token_id)`` as
tokens come, where the backend can stream.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from llmopt import artifact
from llmopt._deps import version_of
from llmopt.artifact import Manifest
from llmopt.errors import PromptTooLongError, UsageError

TokenCallback = Callable[[int, int], None]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SequenceOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens or sequence_length)


@dataclass
class BatchOutput:
    sequences: list[SequenceOutput]
    ttft_s: float  # prefill: from the call to the first generated token
    decode_s: float  # from the first generated token to the last
    extra: dict = field(default_factory=dict)


SPECULATION_METHODS = ("prompt-lookup", "draft")


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding: candidate tokens proposed cheaply, then verified by the model in one forward.

    ``prompt-lookup`` copies candidates from n-grams of the prompt (no second model); ``draft`` asks a
    small draft model (assisted generation). The model keeps only the candidates it would have
    produced itself, so greedy output is unchanged; the gain depends on how many are accepted.
    """

    method: str  # one of SPECULATION_METHODS
    num_tokens: int = 3  # candidates proposed per step
    draft: str | None = None  # method "draft": a checkpoint (pytorch) or an artifact of the runner's target

    def __post_init__(self):
        if self.method not in SPECULATION_METHODS:
            raise UsageError(f"unknown speculative decoding method '{self.method}'; accepted: {', '.join(SPECULATION_METHODS)}")
        if self.num_tokens < 1:
            raise UsageError(f"speculative decoding needs at least 1 candidate token per step, got {self.num_tokens}")
        if (self.method == "draft") != (self.draft is not None):
            raise UsageError("a draft model is given with method 'draft', and only with it")

    @property
    def label(self) -> str:
        """How rows and logs name it: ``prompt-lookup:3``, ``draft:smol-ov-int4:5``."""
        if self.method == "draft":
            return f"draft:{Path(self.draft).name}:{self.num_tokens}"
        return f"prompt-lookup:{self.num_tokens}"


def max_prompt_tokens(sequence_length: int) -> int:
    """A prompt must leave room for at least one generated token."""
    return sequence_length - 1


def check_prompt_length(prompt_ids: list[int], sequence_length: int, index: int = 0) -> None:
    limit = max_prompt_tokens(sequence_length)
    if not prompt_ids:
        raise UsageError(f"prompt {index + 1} is empty after tokenization; give some text (or drop --raw)")
    if len(prompt_ids) > limit:
        raise PromptTooLongError(
            f"prompt {index + 1} has {len(prompt_ids)} tokens but the artifact accepts at most {limit} "
            f"(sequence_length {sequence_length} minus one generated token)",
            hint="re-export with a larger --sequence-length, or shorten the prompt",
        )


def cut_at_eos(tokens: list[int], eos_token_ids: set[int], max_new_tokens: int) -> SequenceOutput:
    """A row of generated ids up to and including its first end token, or ``max_new_tokens`` of them."""
    for index, token in enumerate(tokens):
        if token in eos_token_ids:
            return SequenceOutput(tokens[: index + 1], "stop")
    return SequenceOutput(tokens[:max_new_tokens], "length")


def read_eos_ids(path: Path) -> set[int]:
    """End-of-sequence ids from generation_config.json (int or list), falling back to config.json."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                return set(value) if isinstance(value, list) else {int(value)}
    return set()


class Runner(ABC):
    target: ClassVar[str]
    extra: ClassVar[str]
    # Distributions whose versions must be able to load what the exporter recorded.
    backend_distributions: ClassVar[tuple[str, ...]] = ()
    # The runtime that executes the artifact, named when it fails.
    runtime_name: ClassVar[str] = ""
    # Whether generate applies SamplingConfig.repetition_penalty.
    repetition_penalty: ClassVar[bool] = True
    # Speculative decoding methods this runner implements (see ``Speculation``), at batch size 1.
    speculation_methods: ClassVar[tuple[str, ...]] = ()

    def __init__(self, path: Path, batch_size: int, sequence_length: int, manifest: Manifest | None = None):
        self.path = Path(path)
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.manifest = manifest
        self.eos_token_ids = read_eos_ids(self.path)
        self._tokenizer = None
        self.speculation: Speculation | None = None

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, **options) -> "Runner":
        """Check the artifact (manifest, file hashes, backend versions), then open it."""
        path = Path(path)
        manifest = artifact.load(path, verify=verify)
        installed = {name: version_of(name) for name in cls.backend_distributions}
        artifact.check_backend_versions(path, manifest, installed, cls.extra)
        return cls(path, manifest.batch_size, manifest.sequence_length, manifest=manifest, **options)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def set_speculation(self, speculation: Speculation | None) -> None:
        """Use speculative decoding for the following ``generate`` calls (None: plain decoding).

        Refused, before any work, where this runner or its pinned batch size cannot do it."""
        if speculation is not None:
            if speculation.method not in self.speculation_methods:
                able = f"it supports {', '.join(self.speculation_methods)}" if self.speculation_methods else \
                    "use an openvino artifact or the pytorch baseline"
                raise UsageError(f"the {self.target} runner does not support {speculation.method} decoding; {able}")
            if self.batch_size != 1:
                raise UsageError(f"{speculation.method} decoding needs an artifact pinned to batch size 1, "
                                 f"this one is pinned to {self.batch_size}")
        self._apply_speculation(speculation)
        self.speculation = speculation

    def _apply_speculation(self, speculation: Speculation | None) -> None:
        """Runner-specific part of ``set_speculation``; only called with a supported method."""

    def check_draft_tokenizer(self, draft: Path) -> None:
        """A draft proposes token ids, so it must share this model's vocabulary exactly."""
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(draft).get_vocab() != self.tokenizer.get_vocab():
            raise UsageError(f"draft model '{draft}' has another tokenizer than '{self.path}'; a draft must share it")

    def check_batch(self, batch: list[list[int]]) -> None:
        """Exactly ``batch_size`` rows, each a prompt that leaves room for one generated token."""
        if len(batch) != self.batch_size:
            raise UsageError(f"the artifact runs batches of exactly {self.batch_size} rows, got {len(batch)}")
        for index, ids in enumerate(batch):
            check_prompt_length(ids, self.sequence_length, index)

    @abstractmethod
    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        """Generate for exactly ``batch_size`` prompts of token ids."""

    def profile(self, batch: list[list[int]], new_tokens: int) -> dict:
        """One greedy generation under the runtime's own profiler: ``llmopt.profiling.summarize``'s dict."""
        raise UsageError(f"the {self.target} runner has no profiler; --profile covers onnx and openvino artifacts")

    @abstractmethod
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits, shape [len(token_ids), vocab], float32."""

    def close(self) -> None:
        """Release backend resources; runners hold no state that needs saving."""
