"""Calibration text for data-aware quantization, resolved offline.

Shipped sets (``quantization.dataset``):

* ``chat``: hand-written user/assistant exchanges (``llmopt/data/calibration_chat.jsonl``),
  formatted with the model's chat template, so the activations look like those of real use.
* ``pydoc``: paragraphs of the Python language reference that CPython ships as
  ``pydoc_data.topics`` (~465 KB of English technical prose and code).
* ``default`` (also ``auto``): both, interleaved, chat first.

A local ``.txt`` (samples separated by blank lines) or ``.jsonl`` file (one object a line with
``messages``, ``text``, or ``prompt`` and ``response``) works too. Nothing is downloaded: a Hub
dataset name is a one-line error. No sample may share a run of words with the held-out
validation text (``llmopt/data/validation.txt``): such samples are dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from llmopt.errors import RecipeError

SHIPPED = ("default", "chat", "pydoc")
ALIASES = {"auto": "default"}
CHAT_FILE = "calibration_chat.jsonl"
OVERLAP_WORDS = 8  # a sample sharing this many consecutive words with the validation text is dropped
MIN_SAMPLE_CHARS = 200


@dataclass
class Sample:
    """One calibration sample: a chat (list of messages) or plain text."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None

    def render(self, tokenizer=None) -> str:
        if self.messages is None:
            return self.text or ""
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(self.messages, tokenize=False)
        return "\n".join(f"{message['role']}: {message['content']}" for message in self.messages)


def names() -> list[str]:
    return [*SHIPPED, *ALIASES]


def _chat_samples() -> list[Sample]:
    text = resources.files("llmopt.data").joinpath(CHAT_FILE).read_text(encoding="utf-8")
    return _jsonl_samples(text, CHAT_FILE)


def _pydoc_samples() -> list[Sample]:
    """Paragraph groups of the Python reference, each at least MIN_SAMPLE_CHARS long, in a fixed order."""
    from pydoc_data import topics

    samples: list[Sample] = []
    for name in sorted(topics.topics):
        chunk = ""
        for paragraph in re.split(r"\n\s*\n", topics.topics[name]):
            paragraph = paragraph.strip()
            if not paragraph or set(paragraph) <= set("*=-~ "):
                continue
            chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
            if len(chunk) >= 4 * MIN_SAMPLE_CHARS:
                samples.append(Sample(text=chunk))
                chunk = ""
        if len(chunk) >= MIN_SAMPLE_CHARS:
            samples.append(Sample(text=chunk))
    return _spread(samples)


def _spread(samples: list[Sample]) -> list[Sample]:
    """A fixed reordering whose every prefix covers the whole list evenly (golden-ratio sequence)."""
    order = sorted(range(len(samples)), key=lambda index: (index * 0.6180339887) % 1.0)
    return [samples[index] for index in order]


def _interleave(*groups: list[Sample]) -> list[Sample]:
    mixed: list[Sample] = []
    for index in range(max(len(group) for group in groups)):
        mixed.extend(group[index] for group in groups if index < len(group))
    return mixed


def _jsonl_samples(text: str, where: str) -> list[Sample]:
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"quantization.dataset '{where}' line {number}: not valid JSON ({exc.msg})") from exc
        if isinstance(item, str):
            samples.append(Sample(text=item))
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            samples.append(Sample(messages=item["messages"]))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            samples.append(Sample(text=item["text"]))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            messages = [{"role": "user", "content": item["prompt"]}]
            if isinstance(item.get("response"), str):
                messages.append({"role": "assistant", "content": item["response"]})
            samples.append(Sample(messages=messages))
        else:
            raise RecipeError(
                f"quantization.dataset '{where}' line {number}: expected an object with "
                "'messages', 'text', or 'prompt' (and 'response')"
            )
    return samples


def _file_samples(path: Path) -> list[Sample]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"quantization.dataset '{path}' is not UTF-8 text") from exc
    if path.suffix == ".jsonl":
        return _jsonl_samples(text, str(path))
    return [Sample(text=part.strip()) for part in re.split(r"\n\s*\n", text) if part.strip()]


def check_name(name: str | None) -> None:
    """RecipeError for a dataset that is neither shipped nor a .txt/.jsonl path. Pure: no disk."""
    if name is None or name in SHIPPED or name in ALIASES or name.endswith((".txt", ".jsonl")):
        return
    raise RecipeError(
        f"quantization.dataset '{name}' is neither a shipped set nor a local .txt/.jsonl file; "
        f"accepted: {', '.join(names())}, or a path",
        hint="Hub datasets are not downloaded: save the text to a local .txt or .jsonl file and pass its path",
    )


def load(name: str | None) -> list[Sample]:
    """The samples of a shipped set or a local file, in a fixed order, validation overlap removed."""
    name = ALIASES.get(name or "default", name or "default")
    if name == "chat":
        samples = _chat_samples()
    elif name == "pydoc":
        samples = _pydoc_samples()
    elif name == "default":
        samples = _interleave(_chat_samples(), _pydoc_samples())
    else:
        check_name(name)
        path = Path(name).expanduser()
        if not path.is_file():
            raise RecipeError(f"quantization.dataset '{name}': file not found")
        samples = _file_samples(path)
    kept = [sample for sample in samples if not overlaps_validation(sample.render())]
    if not kept:
        raise RecipeError(f"quantization.dataset '{name}' has no usable sample (empty, or all overlap the validation text)")
    return kept


def texts(name: str | None, count: int, tokenizer=None) -> list[str]:
    """``count`` rendered samples (cycling through the set when it is smaller)."""
    samples = load(name)
    return [samples[index % len(samples)].render(tokenizer) for index in range(count)]


# -- held-out validation text -----------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _validation_shingles() -> set[tuple[str, ...]]:
    from llmopt.validation import validation_text

    words = _words(validation_text())
    return {tuple(words[i : i + OVERLAP_WORDS]) for i in range(len(words) - OVERLAP_WORDS + 1)}


_SHINGLES: set[tuple[str, ...]] | None = None


def overlaps_validation(text: str) -> bool:
    """Whether ``text`` shares OVERLAP_WORDS consecutive words with the validation text."""
    global _SHINGLES
    if _SHINGLES is None:
        _SHINGLES = _validation_shingles()
    words = _words(text)
    return any(tuple(words[i : i + OVERLAP_WORDS]) in _SHINGLES for i in range(len(words) - OVERLAP_WORDS + 1))


def token_samples(name: str | None, count: int, tokenizer, max_tokens: int) -> list[list[int]]:
    """``count`` calibration samples as token ids, each at most ``max_tokens`` long."""
    rendered = texts(name, count, tokenizer)
    return [tokenizer.encode(text, add_special_tokens=False)[:max_tokens] for text in rendered]
