"""Run OpenVINO artifacts with openvino-genai's LLMPipeline.

llmopt tokenizes and applies the chat template itself, so the pipeline gets token ids
(``TokenizedInputs``, rows left-padded with the pad id and masked), never text: given a string,
LLMPipeline would apply the chat template a second time. The paged-attention scheduler is always
asked for explicitly: where it cannot compile, openvino-genai would otherwise fall back, silently,
to its stateful loop, which drops finished rows from the batch and so fails on the artifact's
pinned batch dimension. Its prefix caching is off, so a repeated prompt is prefilled again and its
time to first token stays honest. openvino-genai streams only a batch of one; a larger batch
reports its tokens when the call returns.

The pipeline exposes no logits, so ``logits`` compiles the IR itself with OpenVINO Core and the
same properties, and runs the stateful model once over the sequence.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from llmopt import artifact
from llmopt._deps import require
from llmopt.errors import PromptTooLongError, UsageError
from llmopt.runners.base import BatchOutput, Runner, SamplingConfig, SequenceOutput, Speculation, TokenCallback

MODEL_FILE = "openvino_model.xml"
PROMPT_LOOKUP_MAX_NGRAM = 3  # longest prompt n-gram matched for prompt-lookup candidates
# Properties that only openvino-genai reads; OpenVINO Core refuses them.
GENAI_ONLY_PROPERTIES = ("ATTENTION_BACKEND",)


class OpenVINORunner(Runner):
    target = "openvino"
    extra = "openvino"
    backend_distributions = ("openvino", "openvino-genai")
    runtime_name = "openvino-genai"
    # openvino-genai's prompt_lookup pipeline and its speculative decoding with a draft model (another
    # openvino artifact of the same checkpoint, e.g. its int4 build); both on the paged-attention scheduler.
    speculation_methods = ("prompt-lookup", "draft")

    def __init__(self, path: Path, batch_size: int, sequence_length: int, manifest=None):
        super().__init__(path, batch_size, sequence_length, manifest)
        self.ov = require("openvino", extra="openvino")
        self.genai = require("openvino_genai", extra="openvino", package="openvino-genai")
        runtime = (manifest or artifact.read_manifest(self.path)).runtime
        self.device = runtime.get("device", "CPU")
        self.ov_config = dict(runtime.get("ov_config") or {})
        self.scheduler_options = dict(runtime.get("scheduler_config") or {"enable_prefix_caching": False})
        self.model_file = runtime.get("model", MODEL_FILE)
        self._pipeline = None  # both opened on first use: validation needs only the logits model
        self._logits_request = None

    @functools.cached_property
    def pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        if tokenizer.pad_token_id is not None:
            return int(tokenizer.pad_token_id)
        return min(self.eos_token_ids) if self.eos_token_ids else 0  # masked out either way

    @property
    def pipeline(self):
        if self._pipeline is None:
            properties = dict(self.ov_config)
            if self.speculation is not None:
                properties["ATTENTION_BACKEND"] = "PA"  # speculative decoding runs on the scheduler only
            if str(properties.get("ATTENTION_BACKEND", "PA")).upper() != "SDPA":
                properties["scheduler_config"] = self._scheduler_config()
            if self.speculation is not None and self.speculation.method == "prompt-lookup":
                properties["prompt_lookup"] = True
            elif self.speculation is not None:
                draft = Path(self.speculation.draft)
                draft_runtime = artifact.read_manifest(draft).runtime
                draft_properties = {key: value for key, value in (draft_runtime.get("ov_config") or {}).items()
                                    if key not in GENAI_ONLY_PROPERTIES}
                properties["draft_model"] = self.genai.draft_model(
                    str(draft), draft_runtime.get("device", self.device),
                    scheduler_config=self._scheduler_config(), **draft_properties)
            self._pipeline = self.genai.LLMPipeline(str(self.path), self.device, **properties)
        return self._pipeline

    def _scheduler_config(self):
        scheduler = self.genai.SchedulerConfig()
        for name, value in self.scheduler_options.items():
            setattr(scheduler, name, value)
        return scheduler

    def _apply_speculation(self, speculation: Speculation | None) -> None:
        if speculation is not None and speculation.draft is not None:
            check_draft_artifact(Path(speculation.draft), self)
        self._pipeline = None  # rebuilt on the next call, with or without the speculative pipeline

    def _generation_config(self, sampling: SamplingConfig, max_new_tokens: int):
        config = self.genai.GenerationConfig()
        config.max_new_tokens = max_new_tokens
        # No end-of-sequence ids (a fixed-length benchmark): genai would still stop at its own.
        config.ignore_eos = not self.eos_token_ids
        if self.eos_token_ids:
            config.eos_token_id = min(self.eos_token_ids)
            config.stop_token_ids = set(self.eos_token_ids)
        config.repetition_penalty = sampling.repetition_penalty
        if self.speculation is not None:
            config.num_assistant_tokens = self.speculation.num_tokens
            if self.speculation.method == "prompt-lookup":
                config.max_ngram_size = PROMPT_LOOKUP_MAX_NGRAM
        config.do_sample = not sampling.greedy
        if not sampling.greedy:
            config.temperature = sampling.temperature
            config.top_p = sampling.top_p
            if sampling.top_k > 0:  # 0 means no top-k limit, as in transformers
                config.top_k = sampling.top_k
            config.rng_seed = sampling.seed
        return config

    def _left_padded(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), the rows left-padded to the longest, as openvino-genai takes them."""
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = ids
            attention_mask[row, width - len(ids):] = 1
        return input_ids, attention_mask

    def _inputs(self, batch: list[list[int]]):
        input_ids, attention_mask = self._left_padded(batch)
        return self.genai.TokenizedInputs(self.ov.Tensor(input_ids), self.ov.Tensor(attention_mask)), input_ids.shape[1]

    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        self.check_batch(batch)
        inputs, width = self._inputs(batch)
        max_new_tokens = min(sampling.max_new_tokens, self.sequence_length - width)
        config = self._generation_config(sampling, max_new_tokens)
        pipeline = self.pipeline
        streamer = token_streamer_class(self.genai)(on_token) if on_token is not None and self.batch_size == 1 else None
        started = time.perf_counter()
        result = pipeline.generate(inputs, config, streamer)
        done_at = time.perf_counter()
        rows = [list(tokens)[:max_new_tokens] for tokens in result.tokens]
        if on_token is not None and streamer is None:
            for row, tokens in enumerate(rows):
                for token in tokens:
                    on_token(row, token)
        ttft_s = min(result.perf_metrics.get_ttft().mean / 1000.0, done_at - started)
        return BatchOutput(
            sequences=[self._sequence(tokens) for tokens in rows],
            ttft_s=ttft_s,
            decode_s=done_at - started - ttft_s,
        )

    def _sequence(self, tokens: list[int]) -> SequenceOutput:
        for index, token in enumerate(tokens):
            if token in self.eos_token_ids:
                return SequenceOutput(tokens[: index + 1], "stop")
        return SequenceOutput(tokens, "length")

    def logits(self, token_ids: list[int]) -> np.ndarray:
        if len(token_ids) > self.sequence_length:
            raise PromptTooLongError(
                f"{len(token_ids)} tokens do not fit the artifact's sequence_length {self.sequence_length}"
            )
        request = self._logits_infer_request()
        request.reset_state()  # the key/value cache is internal state: start from an empty one
        length = len(token_ids)
        # The batch dimension is pinned: feed batch_size copies and read the first row.
        rows = self.batch_size
        request.infer(own_inputs(request, {
            "input_ids": np.tile(np.asarray(token_ids, dtype=np.int64), (rows, 1)),
            "attention_mask": np.ones((rows, length), dtype=np.int64),
            "position_ids": np.tile(np.arange(length, dtype=np.int64), (rows, 1)),
            "beam_idx": np.arange(rows, dtype=np.int32),
        }))
        return np.array(request.get_tensor("logits").data[0], dtype=np.float32)

    def profile(self, batch: list[list[int]], new_tokens: int) -> dict:
        """OpenVINO's performance counters on the artifact's IR, compiled with the pipeline's properties.

        openvino-genai does not expose its infer requests, so the same IR runs here in a plain greedy
        loop over its stateful KV cache; the pipeline itself runs attention through its paged-attention
        scheduler, so the attention share here is that of the stateful graph (the matmuls are the same).
        """
        from llmopt import profiling

        self.check_batch(batch)
        properties = {key: value for key, value in self.ov_config.items() if key not in GENAI_ONLY_PROPERTIES}
        compiled = self.ov.Core().compile_model(str(self.path / self.model_file), self.device,
                                                {**properties, "PERF_COUNT": True})
        request = compiled.create_infer_request()
        input_ids, mask = self._left_padded(batch)
        rows, width = input_ids.shape
        steps = min(new_tokens, self.sequence_length - width)
        records, wall = [], {"prefill": 0.0, "decode": 0.0}
        request.reset_state()
        feeds = {"input_ids": input_ids, "attention_mask": mask,
                 "position_ids": np.maximum(np.cumsum(mask, axis=1) - 1, 0), "beam_idx": np.arange(rows, dtype=np.int32)}
        for step in range(steps):
            phase = "prefill" if step == 0 else "decode"
            started = time.perf_counter()
            request.infer(own_inputs(request, feeds))
            tokens = np.asarray(request.get_tensor("logits").data[:, -1]).argmax(-1)
            wall[phase] += (time.perf_counter() - started) * 1000
            records += profiling.from_openvino_counters(request.get_profiling_info(), phase)
            mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
            feeds = {"input_ids": tokens[:, None].astype(np.int64), "attention_mask": mask,
                     "position_ids": (mask.sum(axis=1, keepdims=True) - 1), "beam_idx": feeds["beam_idx"]}
        return {**profiling.summarize(records, wall, steps - 1),
                "note": "the artifact's IR in a plain stateful loop; openvino-genai runs it through its scheduler"}

    def _logits_infer_request(self):
        if self._logits_request is None:
            properties = {key: value for key, value in self.ov_config.items() if key not in GENAI_ONLY_PROPERTIES}
            compiled = self.ov.Core().compile_model(str(self.path / self.model_file), self.device, properties)
            self._logits_request = compiled.create_infer_request()
        return self._logits_request

    def close(self) -> None:
        self._pipeline = None
        self._logits_request = None


def check_draft_artifact(draft: Path, runner: OpenVINORunner) -> None:
    """A draft for ``runner``: an openvino artifact with the same vocabulary, one row, room for the sequence."""
    if not (draft / artifact.MANIFEST_NAME).is_file():
        raise UsageError(f"draft model '{draft}' is not an llmopt artifact (no {artifact.MANIFEST_NAME}); the openvino "
                         "runner drafts with another openvino artifact of the same checkpoint (e.g. its int4 build)")
    manifest = artifact.load(draft, verify=False)
    if manifest.target != "openvino" or manifest.static:
        kind = f"target {manifest.target}" + (", static shapes" if manifest.static else "")
        raise UsageError(f"draft model '{draft}' is an artifact of {kind}; "
                         "the openvino runner drafts with a (dynamic-shape) openvino artifact")
    if manifest.sequence_length < runner.sequence_length:
        raise UsageError(f"draft model '{draft}' holds {manifest.sequence_length} tokens, fewer than the "
                         f"{runner.sequence_length} of '{runner.path}'")
    runner.check_draft_tokenizer(draft)


@functools.cache
def token_streamer_class(genai):
    """A StreamerBase subclass, made once openvino_genai is imported."""

    class TokenStreamer(genai.StreamerBase):
        """Hands each generated token of the one row to ``on_token`` as openvino-genai decodes it."""

        def __init__(self, on_token: TokenCallback):
            super().__init__()
            self.on_token = on_token

        def write(self, token):
            for token_id in token if isinstance(token, list) else [token]:
                self.on_token(0, int(token_id))
            return genai.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    return TokenStreamer


def own_inputs(request, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds the IR has inputs for (position_ids is optional in optimum-intel's stateful IRs)."""
    names = {name for port in request.model_inputs for name in port.get_names()}
    return {name: value for name, value in feeds.items() if name in names}
