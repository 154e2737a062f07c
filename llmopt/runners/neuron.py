"""Run a Neuron artifact: ``NeuronModelForCausalLM.from_pretrained(artifact)`` + ``generate``.

Sampling follows the optimum-neuron Llama-2 guide (https://huggingface.co/blog/inferentia-llama2):
``generate(**inputs, max_new_tokens=..., do_sample=True, temperature=0.9, top_k=50, top_p=0.9)``;
greedy when the temperature is 0. optimum-neuron>=0.4 samples on the device and takes no streamer,
so tokens are reported (and the first-token time taken) by a stopping criterion, which
``generate`` calls once after the prefill and once after every decode step.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from llmopt._deps import install_hint
from llmopt.errors import LlmoptError, MissingDependencyError, UsageError
from llmopt.hardware import NEURON_MAX_TOP_K, NEURON_TOP_K_REFUSED, REPETITION_PENALTY_REFUSED, neuron_device_present
from llmopt.runners.base import BatchOutput, Runner, SamplingConfig, TokenCallback, cut_at_eos


def _stopping_criterion(torch, on_token: TokenCallback | None, prompt_width: int, clock: dict):
    """A transformers StoppingCriteria that never stops: it times the first token and streams tokens."""
    from transformers import StoppingCriteria

    class _Watch(StoppingCriteria):
        def __init__(self):
            self.seen = prompt_width

        def __call__(self, input_ids, scores=None, **kwargs):
            if clock.get("first") is None:
                clock["first"] = time.perf_counter()
            if on_token is not None:
                for position in range(self.seen, input_ids.shape[1]):
                    for row in range(input_ids.shape[0]):
                        on_token(row, int(input_ids[row, position]))
            self.seen = input_ids.shape[1]
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return _Watch()


class NeuronRunner(Runner):
    target = "neuron"
    extra = "neuron"
    backend_distributions = ("optimum-neuron", "neuronx-cc")
    runtime_name = "optimum-neuron"
    repetition_penalty = False  # on-device sampling has none: a penalty is refused, not ignored

    def __init__(self, path: Path, batch_size: int, sequence_length: int, manifest=None):
        super().__init__(path, batch_size, sequence_length, manifest)
        if not neuron_device_present():
            raise MissingDependencyError(
                f"artifact '{path}' needs a Neuron device (Inferentia2/Trainium): no /dev/neuron0 and neuron-ls finds none",
                hint="run it on the instance type it was compiled for (see llmopt inspect)",
            )
        try:
            import torch
            from optimum.neuron import NeuronModelForCausalLM
        except ImportError as exc:
            raise MissingDependencyError(
                f"the 'neuron' target needs optimum-neuron, which is not installed ({exc.name})",
                hint=f"install it with: {install_hint('neuron')}",
            ) from exc
        self.torch = torch
        runtime = (manifest.runtime if manifest else {}) or {}
        self.padding_side = runtime.get("padding_side", "right")  # optimum-neuron 0.4 takes right padding only
        self.model = NeuronModelForCausalLM.from_pretrained(str(self.path))

    def _pad(self, batch: list[list[int]]):
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_token_ids) if self.eos_token_ids else 0
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), pad, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            start = 0 if self.padding_side == "right" else width - len(ids)
            input_ids[row, start:start + len(ids)] = ids
            mask[row, start:start + len(ids)] = 1
        return self.torch.from_numpy(input_ids), self.torch.from_numpy(mask), pad

    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        from transformers import StoppingCriteriaList

        if sampling.repetition_penalty != 1.0:  # refused, not silently ignored by on-device sampling
            raise UsageError(REPETITION_PENALTY_REFUSED.format(where="--repetition-penalty"))
        if not sampling.greedy and not 1 <= sampling.top_k <= NEURON_MAX_TOP_K:
            raise UsageError(NEURON_TOP_K_REFUSED.format(where="--top-k", value=sampling.top_k))
        torch = self.torch
        input_ids, attention_mask, pad = self._pad(batch)
        options = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad,
                       eos_token_id=sorted(self.eos_token_ids) or None, do_sample=not sampling.greedy)
        if not sampling.greedy:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
            torch.manual_seed(sampling.seed)
        clock: dict = {}
        watch = _stopping_criterion(torch, on_token, input_ids.shape[1], clock)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         stopping_criteria=StoppingCriteriaList([watch]), **options)
        finished = time.perf_counter()
        first = clock.get("first") or finished
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return BatchOutput(
            sequences=[cut_at_eos(row, self.eos_token_ids, sampling.max_new_tokens) for row in new_tokens],
            ttft_s=first - started,
            decode_s=finished - first,
        )

    def logits(self, token_ids: list[int]) -> np.ndarray:
        raise LlmoptError(
            "Neuron artifacts return sampled tokens, not logits (optimum-neuron compiles decoders with on-device "
            "sampling and refuses output_logits/output_scores), so teacher-forced validation is not available here",
            hint="compare generations instead: llmopt run ARTIFACT PROMPT --temperature 0",
        )
