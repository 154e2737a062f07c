"""The prompts every subject of a benchmark sees: built once, in the parent, from one tokenizer.

* synthetic: token ids of an exact length, sampled (seeded) from the tokenizer's normal vocabulary,
  never a special, added or end-of-sequence id. Row ``r`` of a batch depends only on
  (seed, length, r), so the batch-1 prompt is row 0 of the batch-4 one.
* grounded: a real summarization request (instruction + passage, chat template applied), for
  prompt-lookup decoding, which only helps when the output copies from the input.
"""

from __future__ import annotations

import numpy as np

from llmopt.errors import UsageError
from llmopt.generation import encode_prompt

GROUNDED_INSTRUCTION = "Summarize the following report in a few sentences, keeping the names and figures.\n\n"

# Written for llmopt (no third-party text); names and figures a summary tends to copy verbatim.
GROUNDED_PASSAGE = """\
Harbor District Water Board, quarterly report.

In the third quarter the Harbor District Water Board replaced 14 kilometres of cast-iron mains on \
Linden Street, Quarry Road and the old ferry terminal, finishing the Linden Street section two weeks \
ahead of schedule. The work cost 3.2 million euros, 8 percent less than the budget approved in March, \
because the contractor, Vermeer and Daughters, reused the trench shoring from the spring project.

Leak losses fell from 21 percent of pumped water to 16 percent. The board's engineer, Amara Okafor, \
said the largest single saving came from the pressure-reducing valves installed at the Quarry Road \
pumping station, which cut night-time pressure by a third. She warned that the Hillside reservoir, \
built in 1962, still loses about 400 cubic metres a day through cracks in its north wall, and asked \
the board to fund a full relining in the next budget.

Customer complaints about discoloured water dropped from 312 in the second quarter to 87 in the \
third. Most of the remaining complaints came from the Saltmarsh estate, where the mains are scheduled \
for replacement next year. The customer service manager, Tomas Lindqvist, reported that the average \
time to answer a call fell from six minutes to ninety seconds after the new telephone system went live \
in July.

The board approved three decisions. First, the Hillside reservoir relining will be put out to tender \
in January with a ceiling of 1.1 million euros. Second, water prices will rise by 2.5 percent from \
April, below the inflation rate of 3.1 percent. Third, the board will publish leak figures for every \
district each month on its website, starting in November.

The next meeting of the Harbor District Water Board is on the 14th of December at the ferry terminal \
offices. Members of the public may attend and ask questions about the Saltmarsh mains replacement, \
the Hillside reservoir and the new monthly leak figures.
"""


def excluded_ids(tokenizer, eos_token_ids: set[int] | None = None) -> set[int]:
    """Special, added and end-of-sequence ids: never part of a synthetic prompt."""
    excluded = set(getattr(tokenizer, "all_special_ids", []) or [])
    excluded |= {int(index) for index in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
    excluded |= set(eos_token_ids or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        excluded.add(int(tokenizer.eos_token_id))
    return excluded


def normal_vocab(tokenizer, eos_token_ids: set[int] | None = None) -> np.ndarray:
    """The ids a synthetic prompt is sampled from, ascending."""
    excluded = excluded_ids(tokenizer, eos_token_ids)
    ids = np.array([index for index in range(len(tokenizer)) if index not in excluded], dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the tokenizer has no normal (non-special) token ids")
    return ids


def synthetic_batch(vocab: np.ndarray, length: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """``batch_size`` rows of exactly ``length`` ids; row r depends only on (seed, length, r)."""
    if length < 1:
        raise ValueError(f"a prompt needs at least one token, got length {length}")
    return [np.random.default_rng([seed, length, row]).choice(vocab, size=length).tolist() for row in range(batch_size)]


def grounded_text(tokenizer, max_tokens: int) -> str:
    """The summarization request (instruction + passage), its passage cut so that with the chat
    template it takes at most ``max_tokens`` tokens."""
    passage_ids = tokenizer.encode(GROUNDED_PASSAGE, add_special_tokens=False)
    overhead = len(encode_prompt(tokenizer, GROUNDED_INSTRUCTION, chat=True))
    keep = len(passage_ids)
    while keep > 0:
        text = GROUNDED_INSTRUCTION + tokenizer.decode(passage_ids[:keep])
        length = len(encode_prompt(tokenizer, text, chat=True))
        if length <= max_tokens:
            return text
        keep -= max(1, length - max_tokens)  # cutting n passage tokens shortens the prompt by about n
    raise UsageError(f"the prompt-lookup prompt needs {overhead} tokens even without its passage, "
                     f"more than the {max_tokens} the sequence length leaves",
                     hint="use a larger --sequence-length, or a smaller --new-tokens")


def grounded_prompt(tokenizer, max_tokens: int) -> list[int]:
    """The summarization request as token ids, chat template applied, at most ``max_tokens`` long."""
    return encode_prompt(tokenizer, grounded_text(tokenizer, max_tokens), chat=True)
