"""Run a TensorRT-LLM engine artifact with the ``LLM`` API of the release that built it.

Before anything imports tensorrt_llm, ``check_engine_compatible`` compares the manifest with this
machine: a GPU must be present (its own error), its architecture (SM) must be the one the engine
was built for, and the installed tensorrt_llm / TensorRT must be the exact versions that built it.
TensorRT engines are not portable across either, and loading one anyway fails deep in C++.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from llmopt import artifact
from llmopt._deps import install_hint, version_of
from llmopt.artifact import Manifest
from llmopt.errors import ArtifactError, MissingDependencyError
from llmopt.hardware import DetectedGpu, detect_gpus, sm_architecture
from llmopt.runners.base import BatchOutput, Runner, SamplingConfig, SequenceOutput, TokenCallback


def _installed_versions() -> dict[str, str | None]:
    from llmopt.exporters.tensorrt import installed_tensorrt_version

    return {"tensorrt_llm": version_of("tensorrt_llm"), "tensorrt": installed_tensorrt_version()}


def check_engine_compatible(path: Path, manifest: Manifest, gpus: list[DetectedGpu] | None = None,
                            installed: dict[str, str | None] | None = None) -> None:
    """Refuse, with the reason, an engine this machine cannot run. Imports no NVIDIA library."""
    runtime = manifest.runtime or {}
    built_gpu = runtime.get("gpu") or {}
    gpus = detect_gpus() if gpus is None else gpus
    if not gpus:
        raise MissingDependencyError(
            f"artifact '{path}' is a TensorRT engine and needs an NVIDIA GPU; this machine has none (nvidia-smi finds no GPU)",
            hint="run it on a machine with the GPU it was built for" + (f" ({built_gpu['name']})" if built_gpu.get("name") else ""),
        )
    current = gpus[0]
    if built_gpu.get("sm") is not None and int(built_gpu["sm"]) != current.sm:
        built_sm = int(built_gpu["sm"])
        raise ArtifactError(
            f"artifact '{path}' is a TensorRT engine built for sm{built_sm} ({sm_architecture(built_sm)}, "
            f"{built_gpu.get('name', 'unknown GPU')}) but this machine's GPU is {current.name} "
            f"(sm{current.sm}, {current.architecture}); an engine runs only on the GPU architecture it was built for",
            hint="re-export it on this machine",
        )
    built_versions = runtime.get("versions") or {}
    have = _installed_versions() if installed is None else installed
    for name in ("tensorrt_llm", "tensorrt"):
        built = built_versions.get(name)
        if built is None:
            continue
        if have.get(name) is None:
            raise MissingDependencyError(
                f"artifact '{path}' needs {name} {built}, which is not installed",
                hint=f"install it with: {install_hint('tensorrt')}",
            )
        if have[name] != built:
            raise ArtifactError(
                f"artifact '{path}' is a TensorRT engine built with {name} {built}; this machine has {have[name]}, "
                "and engines load only with the exact version that built them",
                hint=f"install {name}=={built}, or re-export the artifact here",
            )


class TensorRTRunner(Runner):
    target = "tensorrt"
    extra = "tensorrt"
    backend_distributions = ("tensorrt_llm",)

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
        from llmopt.exporters.tensorrt import ENGINE_DIR, llm_class

        try:
            from tensorrt_llm import SamplingParams
        except ImportError as exc:
            raise MissingDependencyError(
                f"the 'tensorrt' target needs tensorrt_llm, which is not installed ({exc.name})",
                hint=f"install it with: {install_hint('tensorrt')}",
            ) from exc
        runtime = (manifest.runtime if manifest else {}) or {}
        self.SamplingParams = SamplingParams
        self.gather_context_logits = bool((runtime.get("build_config") or {}).get("gather_context_logits"))
        engine_dir = self.path / runtime.get("engine_dir", ENGINE_DIR)
        self.llm = llm_class()(
            model=str(engine_dir),
            skip_tokenizer_init=True,  # llmopt tokenizes; the engine sees token ids
            tensor_parallel_size=int(runtime.get("tensor_parallel_size", 1)),
        )
        self.end_id = min(self.eos_token_ids) if self.eos_token_ids else None
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_id

    def _sampling_params(self, sampling: SamplingConfig, **extra):
        options = dict(max_tokens=sampling.max_new_tokens, end_id=self.end_id, pad_id=self.pad_id,
                       repetition_penalty=sampling.repetition_penalty, **extra)
        if sampling.greedy:
            options.update(top_k=1)  # greedy
        else:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
            options["seed"] = sampling.seed
            options["random_seed"] = sampling.seed  # the name before seed
        known = {item.name for item in dataclasses.fields(self.SamplingParams)}
        return self.SamplingParams(**{key: value for key, value in options.items() if key in known})

    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        params = self._sampling_params(sampling)
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
            requests = [self.llm.generate_async(ids, params, streaming=True) for ids in batch]
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
        params = self._sampling_params(SamplingConfig(max_new_tokens=1), return_context_logits=True)
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
