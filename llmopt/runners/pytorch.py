"""The PyTorch baseline: plain transformers on a checkpoint, the reference for parity and bench.

Modes follow the transformers optimization guide: ``eager`` (dynamic cache, SDPA attention),
``static`` (a static KV cache sized to sequence_length) and ``compile`` (static cache plus
``torch.compile`` of the forward).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from llmopt import events
from llmopt._deps import require
from llmopt.errors import UsageError
from llmopt.runners.base import BatchOutput, Runner, SamplingConfig, Speculation, TokenCallback, cut_at_eos

MODES = ("eager", "static", "compile")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class _TimingStreamer:
    """transformers streamer: the first ``put`` is the prompt, each later one a step of new tokens."""

    def __init__(self, on_token: TokenCallback | None):
        self.on_token = on_token
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.seen_prompt = False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.on_token is not None:
            if value.dim() == 2:  # assisted / prompt-lookup decoding: several tokens of row 0 at once
                for token in value[0].tolist():
                    self.on_token(0, int(token))
                return
            for row, token in enumerate(value.reshape(-1).tolist()):
                self.on_token(row, int(token))

    def end(self) -> None:
        pass


class PyTorchRunner(Runner):
    target = "pytorch"
    extra = "pytorch"
    backend_distributions = ("torch", "transformers")
    runtime_name = "transformers"
    # transformers' prompt_lookup_num_tokens and assisted generation (assistant_model, a checkpoint
    # sharing the tokenizer). Eager mode only: transformers would silently swap a static cache for a
    # dynamic one.
    speculation_methods = ("prompt-lookup", "draft")

    def __init__(self, path: Path, batch_size: int = 1, sequence_length: int = 2048, manifest=None,
                 mode: str = "eager", dtype: str = "fp32", threads: int | None = None, streamed: bool = False):
        super().__init__(path, batch_size, sequence_length, manifest)
        self.dtype = dtype
        self._draft_model = None
        if mode not in MODES:
            raise UsageError(f"unknown PyTorch mode '{mode}'; accepted: {', '.join(MODES)}")
        torch = require("torch", extra="pytorch")
        transformers = require("transformers", extra="pytorch")
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.mode = torch, mode
        placement = {"device_map": device_map} if streamed and (device_map := streamed_device_map(self.path)) else {}
        # accelerate warns that the streamed layers are "on the meta device", which is the point of them
        with events.backend_output_hidden() if placement else contextlib.nullcontext():
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, dtype=getattr(torch, TORCH_DTYPES[dtype]), attn_implementation=attention_for(self.path),
                **placement).eval()
        if placement:
            from llmopt import memory

            for name, place in placement["device_map"].items():  # a streamed layer's tensors are freed as it ends
                if place == "disk":
                    self.model.get_submodule(name).register_forward_hook(lambda *_: memory.trim())
        if mode == "compile":
            self.model.forward = torch.compile(self.model.forward, dynamic=False)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, **options) -> "PyTorchRunner":
        return cls(Path(checkpoint), **options)

    def _pad_left(self, batch: list[list[int]]):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), pad, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = ids
            mask[row, width - len(ids):] = 1
        return self.torch.from_numpy(input_ids), self.torch.from_numpy(mask)

    def _apply_speculation(self, speculation: Speculation | None) -> None:
        if speculation is not None and self.mode != "eager":
            raise UsageError(f"{speculation.method} decoding needs the eager PyTorch mode (a static cache would be "
                             f"swapped for a dynamic one), not '{self.mode}'")
        self._draft_model = None
        if speculation is not None and speculation.draft is not None:
            self._draft_model = self._load_draft(Path(speculation.draft))

    def _load_draft(self, path: Path):
        from transformers import AutoModelForCausalLM

        if not (path / "config.json").is_file():
            raise UsageError(f"draft model '{path}' is not a checkpoint directory (no config.json); the pytorch "
                             "runner drafts with a Hugging Face checkpoint sharing the model's tokenizer")
        self.check_draft_tokenizer(path)
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(self.torch, TORCH_DTYPES[self.dtype]), attn_implementation=attention_for(path)).eval()

    def generate(self, batch: list[list[int]], sampling: SamplingConfig, on_token: TokenCallback | None = None) -> BatchOutput:
        torch = self.torch
        input_ids, attention_mask = self._pad_left(batch)
        options = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                       repetition_penalty=sampling.repetition_penalty, pad_token_id=self.tokenizer.pad_token_id,
                       eos_token_id=sorted(self.eos_token_ids) or None)
        if not sampling.greedy:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
            torch.manual_seed(sampling.seed)
        else:
            options.update(temperature=None, top_k=None, top_p=None)
        if self.mode in ("static", "compile"):
            options.update(cache_implementation="static")
        if self.speculation is not None:
            if len(batch) != 1:
                raise UsageError(f"{self.speculation.method} decoding takes one prompt per call, got {len(batch)}")
            if self.speculation.method == "prompt-lookup":
                options.update(prompt_lookup_num_tokens=self.speculation.num_tokens)
            else:
                options.update(assistant_model=self._draft_model, num_assistant_tokens=self.speculation.num_tokens,
                               num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
            if options["eos_token_id"] is None:  # the candidate search cannot take None: an id never generated
                options["eos_token_id"] = [self.model.config.vocab_size]
        streamer = _TimingStreamer(on_token)
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer, **options)
        finished = time.perf_counter()
        first = streamer.first_token_at or finished
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return BatchOutput(
            sequences=[cut_at_eos(row, self.eos_token_ids, sampling.max_new_tokens) for row in new_tokens],
            ttft_s=first - streamer.started,
            decode_s=finished - first,
        )

    def logits(self, token_ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            output = self.model(torch.tensor([token_ids], dtype=torch.long))
        return output.logits[0].float().numpy()

    def close(self) -> None:
        """Drop the model (and any draft) and give their memory back: the parity check loads the artifact next."""
        from llmopt import memory

        self.model = self._draft_model = None
        memory.release()


def reference_logits(checkpoint: Path, max_tokens: int) -> tuple[list[int], np.ndarray]:
    """The parity check's reference: the validation text's token ids and their teacher-forced fp32 logits.

    The decoder layers stream from the checkpoint's safetensors files (``streamed_device_map``), so the
    whole model never exists in fp32: a 7B checkpoint stored in 16 bits would need 28 GB for it. The
    model is gone, its memory returned, when this returns, so it never sits beside the artifact's runtime."""
    from llmopt import validation

    reference = PyTorchRunner.from_checkpoint(checkpoint, threads=1, streamed=True)
    try:
        token_ids = validation.validation_ids(reference.tokenizer, max_tokens)
        return token_ids, reference.logits(token_ids)
    finally:
        reference.close()


def streamed_device_map(checkpoint: Path) -> dict[str, str] | None:
    """A transformers ``device_map`` that keeps each decoder layer on "disk": accelerate's offload hooks
    then read the layer's tensors from the checkpoint's own safetensors files, cast to the model's dtype,
    just before the layer runs, and drop them after, so one layer at a time is resident. Embeddings,
    final norm and lm_head stay loaded. None (load the whole model) for a checkpoint without safetensors
    (the offload would first write the weights out), a quantized one, or a model whose decoder layers
    are not one ModuleList of ``num_hidden_layers``."""
    if not any(checkpoint.glob("*.safetensors")):
        return None
    accelerate = require("accelerate", extra="pytorch")
    torch = require("torch", extra="pytorch")
    transformers = require("transformers", extra="pytorch")
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint)
        if getattr(config, "quantization_config", None):
            return None
        with accelerate.init_empty_weights():
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError):  # transformers cannot build it without remote code: loading it whole says why
        return None
    count = getattr(config, "num_hidden_layers", None)
    layers = next((name for name, module in skeleton.named_modules()
                   if isinstance(module, torch.nn.ModuleList) and len(module) == count and count), None)
    if layers is None:
        return None
    device_map: dict[str, str] = {}
    for name, _ in [*skeleton.named_parameters(), *skeleton.named_buffers()]:
        if name.startswith(f"{layers}."):
            device_map[".".join(name.split(".")[: layers.count(".") + 2])] = "disk"
        else:
            owner = name.rpartition(".")[0]
            if not owner or layers.startswith(f"{owner}."):  # a tensor of a module that holds the layers
                return None
            device_map[owner] = "cpu"
    return device_map


def attention_for(checkpoint: Path) -> str:
    """sdpa, except for models whose attention scores are soft-capped (Gemma 2): sdpa drops the cap
    silently, so only the eager attention computes the model as trained."""
    import json

    from llmopt.architectures import soft_capped

    config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    return "eager" if soft_capped(config) else "sdpa"
