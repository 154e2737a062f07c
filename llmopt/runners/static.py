"""Runners for fully static-shape artifacts (``shapes.static: true``): llmopt's own small loop.

The artifact holds two graphs with fixed shapes (see ``llmopt.exporters.static``). The host keeps
the key/value cache as numpy arrays [L, B, Hkv, S, D]: prefill fills it, each decode step returns
one new key/value per row, written into slot ``position`` of that row. Prompts are right-padded,
so every row has its own position; additive masks hide padding and empty slots.

``StaticGraphRunner`` is the loop (prefill, decode_one_token, generate); a subclass per backend
only opens the two graphs and runs them on a dict of numpy inputs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from llmopt._deps import require
from llmopt.errors import ArtifactError, UsageError
from llmopt.gpu import TENSORRT_EP, check_compiled_for_this_gpu, check_session_provider, require_gpu
from llmopt.runners.base import BatchOutput, Runner, SamplingConfig, SequenceOutput, TokenCallback

GPU_HINT = "pip install 'llmopt[gpu]' (onnxruntime-gpu, and TensorRT for the tensorrt provider) with an NVIDIA GPU"
MASKED = {np.float32: np.finfo(np.float32).min, np.float16: np.finfo(np.float16).min}


class StaticGraphRunner(Runner):
    """Prefill + decode over two static graphs; subclasses implement _open, _run_prefill, _run_decode."""

    def __init__(self, path: Path, batch_size: int, sequence_length: int, manifest=None, threads: int | None = None):
        super().__init__(path, batch_size, sequence_length, manifest)
        self.runtime = dict(manifest.runtime) if manifest is not None else {}
        self.threads = threads
        graphs = self.runtime.get("graphs") or self.default_graphs
        for name in ("prefill", "decode"):
            if not (self.path / graphs[name]).is_file():
                raise ArtifactError(f"artifact '{self.path}': graph file '{graphs[name]}' is missing",
                                    hint="re-export the artifact")
        self._open(self.path / graphs["prefill"], self.path / graphs["decode"])
        self.cache_shape, element_type = self.cache_shape_and_type()
        self.float_type = np.float16 if element_type == "float16" else np.float32
        if self.cache_shape[1] != batch_size or self.cache_shape[3] != sequence_length:
            raise ArtifactError(
                f"artifact '{self.path}': graphs are built for batch {self.cache_shape[1]} and sequence length "
                f"{self.cache_shape[3]}, the manifest says {batch_size} and {sequence_length}"
            )
        self.masked = MASKED[self.float_type]
        self.pad_token_id = min(self.eos_token_ids) if self.eos_token_ids else 0  # any id: padding is masked

    # -- backend hooks --------------------------------------------------------------------

    default_graphs: dict[str, str] = {}

    def _open(self, prefill: Path, decode: Path) -> None:
        raise NotImplementedError

    def cache_shape_and_type(self) -> tuple[tuple[int, ...], str]:
        """The prefill graph's present_keys shape [L, B, Hkv, S, D] and element type name."""
        raise NotImplementedError

    def _run_prefill(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _run_decode(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    # -- the loop -------------------------------------------------------------------------

    def prefill_mask(self, lengths: np.ndarray) -> np.ndarray:
        """[B, 1, S, S]: query i sees key j when j <= i and j is a prompt token of its row."""
        slots = np.arange(self.sequence_length)
        visible = (slots[None, None, :] <= slots[None, :, None]) & (slots[None, None, :] < lengths[:, None, None])
        return np.where(visible, 0.0, self.masked).astype(self.float_type)[:, None]

    def decode_mask(self, positions: np.ndarray) -> np.ndarray:
        """[B, 1, 1, S + 1]: the cache slots before each row's position, and the new token (last column)."""
        slots = np.arange(self.sequence_length + 1)
        visible = (slots[None, :] < positions[:, None]) | (slots[None, :] == self.sequence_length)
        return np.where(visible, 0.0, self.masked).astype(self.float_type)[:, None, None, :]

    def prefill(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the right-padded prompts; returns logits [B, S, V] and the filled cache."""
        width = self.sequence_length
        lengths = np.array([len(ids) for ids in batch], dtype=np.int64)
        if len(batch) != self.batch_size or lengths.max() > width:
            raise UsageError(f"the graphs take {self.batch_size} rows of at most {width} tokens")
        input_ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
        position_ids = np.broadcast_to(np.arange(width, dtype=np.int64), input_ids.shape).copy()
        return self._run_prefill({"input_ids": input_ids, "position_ids": position_ids,
                                  "attention_mask": self.prefill_mask(lengths)})

    def decode_one_token(self, tokens: np.ndarray, positions: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """One step for every row: returns logits [B, V]; writes the new key/value into slot ``positions``."""
        feeds = {"input_ids": tokens[:, None], "position_ids": positions[:, None],
                 "attention_mask": self.decode_mask(positions)}
        for layer in range(len(keys)):  # views of the host cache: no copy
            feeds[f"past_key_{layer}"], feeds[f"past_value_{layer}"] = keys[layer], values[layer]
        logits, new_keys, new_values = self._run_decode(feeds)
        rows = np.arange(len(tokens))
        # Advanced indices on axes 1 and 3 put the row axis first: [B, L, Hkv, D].
        keys[:, rows, :, positions, :] = new_keys[:, :, :, 0, :].transpose(1, 0, 2, 3)
        values[:, rows, :, positions, :] = new_values[:, :, :, 0, :].transpose(1, 0, 2, 3)
        return logits[:, 0, :]

    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        started = time.perf_counter()
        self.check_batch(batch)
        lengths = np.array([len(ids) for ids in batch], dtype=np.int64)
        sampler = Sampler(sampling, batch)
        logits, present_keys, present_values = self.prefill(batch)
        keys = np.array(present_keys, dtype=self.float_type, copy=True)  # the host cache, written in place
        values = np.array(present_values, dtype=self.float_type, copy=True)
        tokens = sampler.pick(logits[np.arange(len(batch)), lengths - 1])
        first_token_at = time.perf_counter()
        # A row may generate up to the last of the S positions: S - length tokens.
        budget = np.minimum(sampling.max_new_tokens, self.sequence_length - lengths)
        generated: list[list[int]] = [[] for _ in batch]
        finish: list[str | None] = [None] * len(batch)
        positions = lengths.copy()  # where each row's next input token sits
        while True:
            self._take(tokens, generated, finish, budget, on_token)
            active = np.array([reason is None for reason in finish])
            if not active.any():
                break
            logits = self.decode_one_token(tokens, positions, keys, values)
            positions = positions + active  # finished rows stay put: their writes only touch their own slot
            tokens = np.where(active, sampler.pick(logits, generated), self.pad_token_id)
        finished = time.perf_counter()
        return BatchOutput(
            sequences=[SequenceOutput(ids, reason) for ids, reason in zip(generated, finish)],
            ttft_s=first_token_at - started,
            decode_s=finished - first_token_at,
        )

    def _take(self, tokens: np.ndarray, generated: list[list[int]], finish: list[str | None], budget: np.ndarray,
              on_token: TokenCallback | None) -> None:
        """Append each unfinished row's new token; mark rows that hit end-of-sequence or their budget."""
        for row, token in enumerate(tokens.tolist()):
            if finish[row] is not None:
                continue
            generated[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if token in self.eos_token_ids:
                finish[row] = "stop"
            elif len(generated[row]) >= budget[row]:
                finish[row] = "length"

    def logits(self, token_ids: list[int]) -> np.ndarray:
        if len(token_ids) > self.sequence_length:
            raise UsageError(f"{len(token_ids)} tokens do not fit sequence_length {self.sequence_length}")
        logits, _, _ = self.prefill([list(token_ids)] * self.batch_size)
        return np.asarray(logits[0, : len(token_ids)], dtype=np.float32)


class Sampler:
    """Greedy or sampled next tokens from [B, V] logits, in the order transformers applies them."""

    def __init__(self, sampling: SamplingConfig, prompts: list[list[int]]):
        self.sampling = sampling
        self.prompts = prompts
        self.generator = np.random.default_rng(sampling.seed)

    def pick(self, logits: np.ndarray, generated: list[list[int]] | None = None) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float32)
        if self.sampling.repetition_penalty != 1.0:
            logits = self.penalize(logits.copy(), generated or [[] for _ in self.prompts])
        if self.sampling.greedy:
            return logits.argmax(-1).astype(np.int64)
        return np.array([self.sample(row) for row in logits], dtype=np.int64)

    def penalize(self, logits: np.ndarray, generated: list[list[int]]) -> np.ndarray:
        penalty = self.sampling.repetition_penalty
        for row, (prompt, new) in enumerate(zip(self.prompts, generated)):
            seen = np.unique(np.asarray(prompt + new, dtype=np.int64))
            scores = logits[row, seen]
            logits[row, seen] = np.where(scores > 0, scores / penalty, scores * penalty)
        return logits

    def sample(self, logits: np.ndarray) -> int:
        scores = logits.astype(np.float64) / self.sampling.temperature
        top_k = self.sampling.top_k
        if 0 < top_k < scores.size:
            threshold = np.partition(scores, -top_k)[-top_k]
            scores = np.where(scores < threshold, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if self.sampling.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < self.sampling.top_p  # the smallest set reaching top_p
            probs[order[~keep]] = 0.0
            probs /= probs.sum()
        return int(self.generator.choice(probs.size, p=probs))


class OnnxStaticRunner(StaticGraphRunner):
    target = "onnx"
    extra = "onnx"
    backend_distributions = ("onnxruntime",)
    runtime_name = "onnxruntime"
    default_graphs = {"prefill": "prefill.onnx", "decode": "decode.onnx"}

    def _open(self, prefill: Path, decode: Path) -> None:
        providers = [tuple(item) if isinstance(item, list) else item
                     for item in self.runtime.get("providers") or ["CPUExecutionProvider"]]
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if wanted == TENSORRT_EP:  # engines inside: this GPU's architecture and TensorRT version, exactly
            check_compiled_for_this_gpu(self.path, self.runtime, extra="gpu", tied_to=("tensorrt",))
        elif wanted != "CPUExecutionProvider":
            require_gpu(self.path, wanted, GPU_HINT)
        self._graphs, self._providers, self._wanted = {"prefill": prefill, "decode": decode}, providers, wanted
        self.prefill_session, self.decode_session = self._session("prefill"), self._session("decode")

    def _session(self, name: str, profile_prefix: str | None = None):
        ort = require("onnxruntime", extra="onnx")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        session = ort.InferenceSession(str(self._graphs[name]), options, providers=self._providers)
        check_session_provider(session, self._wanted, f"artifact '{self.path}' ({name} graph)", GPU_HINT)
        return session

    def profile(self, batch: list[list[int]], new_tokens: int) -> dict:
        """onnxruntime's session profiling on fresh prefill and decode sessions of the same graphs."""
        from llmopt import profiling

        saved = self.prefill_session, self.decode_session
        with tempfile.TemporaryDirectory(prefix="llmopt-profile-") as scratch:
            self.prefill_session = self._session("prefill", str(Path(scratch) / "prefill"))
            self.decode_session = self._session("decode", str(Path(scratch) / "decode"))
            try:
                output = self.generate(batch, SamplingConfig(max_new_tokens=new_tokens))
                records = (profiling.from_onnxruntime_trace(self.prefill_session.end_profiling(), "prefill")
                           + profiling.from_onnxruntime_trace(self.decode_session.end_profiling(), "decode"))
            finally:
                self.prefill_session, self.decode_session = saved
        return profiling.summarize_generation(records, output)

    def cache_shape_and_type(self):
        present = next(item for item in self.prefill_session.get_outputs() if item.name == "present_keys")
        return tuple(present.shape), "float16" if present.type == "tensor(float16)" else "float32"

    def _run_prefill(self, feeds):
        return tuple(self.prefill_session.run(["logits", "present_keys", "present_values"], feeds))

    def _run_decode(self, feeds):
        return tuple(self.decode_session.run(["logits", "new_keys", "new_values"], feeds))

    def close(self) -> None:
        self.prefill_session = self.decode_session = None


class OpenVINOStaticRunner(StaticGraphRunner):
    target = "openvino"
    extra = "openvino"
    backend_distributions = ("openvino",)
    runtime_name = "openvino"
    default_graphs = {"prefill": "prefill.xml", "decode": "decode.xml"}

    def _open(self, prefill: Path, decode: Path) -> None:
        ov = require("openvino", extra="openvino")
        core = ov.Core()
        device = self.runtime.get("device", "CPU")
        config = dict(self.runtime.get("ov_config") or {})
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        self._graph_paths = {"prefill": prefill, "decode": decode}
        self.prefill_model = core.compile_model(str(prefill), device, config)
        self.decode_model = core.compile_model(str(decode), device, config)
        self.prefill_request = self.prefill_model.create_infer_request()
        self.decode_request = self.decode_model.create_infer_request()

    def cache_shape_and_type(self):
        present = self.prefill_model.output("present_keys")
        return tuple(present.get_shape()), "float16" if present.get_element_type().get_type_name() == "f16" else "float32"

    _counters: list | None = None  # (phase, performance counters) per inference while profiling

    def profile(self, batch: list[list[int]], new_tokens: int) -> dict:
        """OpenVINO's performance counters (PERF_COUNT) on the same graphs, compiled again with them on."""
        from llmopt import profiling

        saved = self.prefill_request, self.decode_request
        core = require("openvino", extra="openvino").Core()
        config = {**dict(self.runtime.get("ov_config") or {}), "PERF_COUNT": True}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        device = self.runtime.get("device", "CPU")
        self.prefill_request = core.compile_model(str(self._graph_paths["prefill"]), device, config).create_infer_request()
        self.decode_request = core.compile_model(str(self._graph_paths["decode"]), device, config).create_infer_request()
        self._counters = []
        try:
            output = self.generate(batch, SamplingConfig(max_new_tokens=new_tokens))
            records = [record for phase, infos in self._counters
                       for record in profiling.from_openvino_counters(infos, phase)]
        finally:
            self.prefill_request, self.decode_request = saved
            self._counters = None
        return profiling.summarize_generation(records, output)

    def _run(self, request, feeds, names):
        # share_inputs: the host cache is read in place; outputs are copied out of the request's buffers.
        results = request.infer(feeds, share_inputs=True)
        if self._counters is not None:
            self._counters.append(("prefill" if request is self.prefill_request else "decode",
                                   request.get_profiling_info()))
        by_name = {output.get_any_name(): value for output, value in results.items()}
        return tuple(by_name[name] for name in names)

    def _run_prefill(self, feeds):
        return self._run(self.prefill_request, feeds, ("logits", "present_keys", "present_values"))

    def _run_decode(self, feeds):
        return self._run(self.decode_request, feeds, ("logits", "new_keys", "new_values"))

    def close(self) -> None:
        self.prefill_request = self.decode_request = self.prefill_model = self.decode_model = None
