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

    def __init__(self, path: Path, batch_size: int, sequence_length: int, manifest: Manifest | None = None):
        self.path = Path(path)
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.manifest = manifest
        self.eos_token_ids = read_eos_ids(self.path)
        self._tokenizer = None

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

    @abstractmethod
    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        """Generate for exactly ``batch_size`` prompts of token ids."""

    @abstractmethod
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits, shape [len(token_ids), vocab], float32."""

    def close(self) -> None:
        """Release backend resources; runners hold no state that needs saving."""
