"""From prompts to results, the same for every target.

Tokenize (with the chat template unless ``raw``), refuse prompts the artifact cannot hold, group
prompts into batches of the artifact's pinned batch size (a short batch is filled with copies of
its last prompt, whose outputs are dropped), stream text as tokens come, and time each batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from llmopt.errors import UsageError
from llmopt.runners.base import Runner, SamplingConfig, check_prompt_length

TextCallback = Callable[[int, str], None]  # (prompt index, new text)


# What ``run`` samples with when neither the flags, the recipe's generation section nor the checkpoint's
# generation_config.json say: a chat assistant's usual settings, seeded so that a run is reproducible.
# Greedy decoding makes small instruct models repeat a phrase until the length limit: SmolLM2-135M's
# answer to the demo prompt repeats a 4-token phrase 30 times greedily; sampled at 0.7 / top-p 0.9 it
# still repeated one up to 11 times over 6 seeds, and at most once with the 1.1 repetition penalty
# (Ollama's default) added.
CHAT_DEFAULTS = {"max_new_tokens": 128, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1,
                 "seed": 0}
GENERATION_CONFIG = "generation_config.json"
_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def checkpoint_sampling(directory: Path) -> dict:
    """The sampling settings of ``directory``'s generation_config.json with transformers' meaning (no
    ``do_sample``: greedy); {} when the file is missing or sets none of them."""
    try:
        config = json.loads((Path(directory) / GENERATION_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    settings = {"max_new_tokens": config["max_new_tokens"]} if isinstance(config.get("max_new_tokens"), int) else {}
    if not any(key in config for key in _SAMPLING_KEYS):
        return settings
    if not config.get("do_sample", False):
        return {**settings, "temperature": 0.0, "repetition_penalty": config.get("repetition_penalty", 1.0)}
    return {**settings, "temperature": config.get("temperature", 1.0), "top_k": config.get("top_k", 50),
            "top_p": config.get("top_p", 1.0), "repetition_penalty": config.get("repetition_penalty", 1.0)}


def resolve_sampling(recipe: dict, directory: Path | None = None, penalty: bool = True, **overrides) -> SamplingConfig:
    """Each source over the one before: the chat defaults, the checkpoint's generation_config.json (in the
    artifact ``directory``), the recipe's generation section, then the non-None ``overrides`` (run's flags).
    ``temperature=0`` is greedy, and plain greedy unless a penalty is asked for. ``penalty``: whether the
    runner applies one (the chat default's is left out where not)."""
    settings = dict(CHAT_DEFAULTS)
    given = dict(checkpoint_sampling(directory)) if directory is not None else {}
    given.update({key: value for key, value in recipe.items() if value is not None})
    given.update({key: value for key, value in overrides.items() if value is not None})
    settings.update(given)
    if "repetition_penalty" not in given and (not penalty or settings["temperature"] == 0):
        settings["repetition_penalty"] = 1.0  # the chat default's penalty goes with its sampling only
    known = SamplingConfig.__dataclass_fields__
    return SamplingConfig(**{key: value for key, value in settings.items() if key in known})


def describe(sampling: SamplingConfig) -> str:
    if sampling.greedy:
        return "greedy"
    return (f"sampled: temperature {sampling.temperature:g}, top-k {sampling.top_k}, top-p {sampling.top_p:g}"
            + (f", repetition penalty {sampling.repetition_penalty:g}" if sampling.repetition_penalty != 1.0 else "")
            + f", seed {sampling.seed}")


@dataclass
class GenerationResult:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    ttft_ms: float
    tokens_per_s: float  # decode rate: generated tokens after the first, over the decode time
    sampling: str = ""  # how the tokens were chosen (``describe``)

    def to_dict(self) -> dict:
        return asdict(self)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=True)


class _TextStream:
    """Incremental detokenization: emit only text that can no longer change."""

    def __init__(self, tokenizer, callback: TextCallback, index: int):
        self.tokenizer, self.callback, self.index = tokenizer, callback, index
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if len(text) > len(self.emitted):
            self.callback(self.index, text[len(self.emitted):])
            self.emitted = text


def generate(
    runner: Runner,
    prompts: list[str],
    sampling: SamplingConfig,
    chat: bool = True,
    on_text: TextCallback | None = None,
) -> list[GenerationResult]:
    """Run every prompt through ``runner`` in batches of its pinned batch size."""
    if not prompts:
        raise UsageError("no prompt given; pass PROMPT arguments or --prompts-file")
    for index, prompt in enumerate(prompts):
        if not prompt:  # the chat template would wrap an empty prompt into a non-empty one
            raise UsageError(f"prompt {index + 1} is empty; give some text")
    tokenizer = runner.tokenizer
    encoded = [encode_prompt(tokenizer, prompt, chat) for prompt in prompts]
    for index, ids in enumerate(encoded):  # refuse before any work
        check_prompt_length(ids, runner.sequence_length, index)

    results: list[GenerationResult] = []
    batch_size = runner.batch_size
    for start in range(0, len(encoded), batch_size):
        group = encoded[start:start + batch_size]
        real_rows = len(group)
        group = group + [group[-1]] * (batch_size - real_rows)
        streams = {row: _TextStream(tokenizer, on_text, start + row) for row in range(real_rows)} if on_text else {}

        def on_token(row: int, token_id: int) -> None:
            if row in streams and token_id not in runner.eos_token_ids:
                streams[row].push(token_id)

        room = runner.sequence_length - max(len(ids) for ids in group)
        batch_sampling = SamplingConfig(**{**asdict(sampling), "max_new_tokens": min(sampling.max_new_tokens, room)})
        output = runner.generate(group, batch_sampling, on_token if streams else None)
        for row in range(real_rows):
            sequence = output.sequences[row]
            ids = [token for token in sequence.token_ids if token not in runner.eos_token_ids]
            decoded = len(sequence.token_ids) - 1
            results.append(
                GenerationResult(
                    prompt=prompts[start + row],
                    text=tokenizer.decode(ids, skip_special_tokens=True),
                    token_ids=sequence.token_ids,
                    prompt_tokens=len(group[row]),
                    finish_reason=sequence.finish_reason,
                    ttft_ms=round(output.ttft_s * 1000.0, 3),
                    tokens_per_s=round(decoded / output.decode_s, 3) if decoded > 0 and output.decode_s > 0 else 0.0,
                )
            )
    return results
