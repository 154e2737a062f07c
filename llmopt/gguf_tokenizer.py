"""The tokenizer of a GGUF file, rebuilt so that it encodes exactly as llama.cpp does.

transformers' GGUF converter gets both vocabulary kinds wrong. For byte-level BPE ('gpt2') the
tokenizer it loads is repaired (``fix_gguf_tokenizer``). For SentencePiece ('llama') it is not used
at all: its merges are built in O(vocab^2) (minutes for a 32k vocab), and ``sentencepiece_tokenizer``
rebuilds the whole pipeline from the GGUF's tokens, scores and token types instead.
"""

from __future__ import annotations

import json
from typing import Any

from llmopt.errors import UsageError

# GGUF tokenizer.ggml.model values llmopt converts.
GGUF_VOCABULARIES = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}

# GGUF token types (gguf.TokenType; the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The original SmolLM2 / GPT-2 style byte-level BPE pipeline. llama.cpp names SmolLM2's
# pre-tokenizer "smollm" (split off every digit, then the GPT-2 regex, like StarCoder); the GGUF
# converter drops the digit split. Other pre-tokenizer names keep what the converter produced.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder"}
_SPACE = "\u2581"  # SentencePiece's visible space


def _template(meta: dict[str, Any], token) -> dict | None:
    """A post-processor adding BOS/EOS exactly where the GGUF's add_bos_token/add_eos_token ask."""
    from tokenizers import processors

    bos = token("bos_token_id") if meta.get("add_bos_token") else None
    eos = token("eos_token_id") if meta.get("add_eos_token") else None
    if bos is None and eos is None:
        return None
    single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
    pair = " ".join([single, *([bos] if bos else []), "$B", *([eos] if eos else [])])
    special = [(t, int(meta[k])) for t, k in ((bos, "bos_token_id"), (eos, "eos_token_id")) if t]
    return json.loads(processors.TemplateProcessing(single=single, pair=pair, special_tokens=special).__getstate__())


def fix_gguf_tokenizer(raw, meta: dict[str, Any]):
    """The converted tokenizer for a GGUF: ``raw`` (what transformers loads) repaired, or rebuilt.

    ``meta`` holds the GGUF's ``tokenizer.ggml.*`` values (keys without that prefix),
    ``chat_template`` and ``context_length``. 'gpt2' vocabularies repair ``raw``; 'llama'
    (SentencePiece) vocabularies are rebuilt from ``meta``'s tokens, scores and token_type and
    ignore ``raw``. Anything else is a UsageError.
    """
    if meta.get("model") == "llama":
        return sentencepiece_tokenizer(meta)
    if meta.get("model") != "gpt2":
        raise UsageError(f"GGUF tokenizer model '{meta.get('model')}' is not supported "
                         f"(supported: {', '.join(f'{k} ({v})' for k, v in GGUF_VOCABULARIES.items())})")
    return _fix_byte_level(raw, meta)


def _fix_byte_level(raw, meta: dict[str, Any]):
    """Rebuild what transformers' GGUF converter gets wrong for a GPT-2 style (byte-level BPE) vocab.

    The converter treats every Llama GGUF as SentencePiece: it chains ByteFallback/Fuse/Replace in
    front of the ByteLevel decoder, turns byte_fallback on, drops the digit split, makes the BOS
    token the EOS token, and adds a BOS to every encode whatever the GGUF's add_bos_token says.
    """
    from tokenizers import Tokenizer
    from transformers import GPT2TokenizerFast

    def token(key: str) -> str | None:
        token_id = meta.get(key)
        return raw.convert_ids_to_tokens(int(token_id)) if token_id is not None else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    spec = json.loads(raw.backend_tokenizer.to_str())
    spec["normalizer"] = None
    if meta.get("pre") in _DIGIT_SPLITTING_PRE:
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]}
    # The ByteLevel processor adds no tokens; a template adds the BOS only where the GGUF asks.
    spec["post_processor"] = _template({**meta, "add_eos_token": False}, token) or \
        {**_BYTE_LEVEL, "add_prefix_space": True, "trim_offsets": False}
    spec["decoder"] = {**_BYTE_LEVEL, "add_prefix_space": True}
    # Byte-level vocabularies cover all 256 bytes: no <0xNN> fallback tokens and no unknown token.
    spec["model"].update(byte_fallback=False, fuse_unk=False, unk_token=None)

    return GPT2TokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=bos,
        eos_token=eos,
        pad_token=token("padding_token_id") or eos,
        unk_token=token("unknown_token_id"),
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,  # else decode() rewrites " ," and " 's"
        model_max_length=int(meta.get("context_length") or 8192),
        chat_template=meta.get("chat_template") or raw.chat_template,
    )


def _flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    # llama.cpp's defaults for a SentencePiece vocabulary when the GGUF does not say.
    return default if meta.get(key) is None else bool(meta[key])


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that replay llama.cpp's SentencePiece merging: the highest-scoring piece first.

    llama.cpp joins the adjacent pair whose concatenation is a token of the highest score (any
    token type), leftmost on ties; a BPE model applies the lowest-ranked merge, leftmost on ties.
    So every split of every token into two tokens is a merge, ranked by the token's score.
    """
    ids = {text: index for index, text in enumerate(tokens)}
    ranked = []
    for index, text in enumerate(tokens):
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[index], index, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_tokenizer(meta: dict[str, Any]):
    """A LlamaTokenizerFast (GemmaTokenizerFast without a space prefix) that tokenizes a GGUF SentencePiece vocabulary as llama.cpp does.

    What transformers' converter gets wrong, and what is done here instead:
    - merges: built in O(vocab^2) and ordered by the scores of their halves within a piece;
      here, from a dict, by the score of the merged piece (llama.cpp's order);
    - space prefix: always on; here ``add_space_prefix`` decides (Gemma: off), and the prefix is a
      normalizer Prepend, so it goes before every text run that follows a special token and before
      leading spaces too, as llama.cpp does (Metaspace skips text that starts with a space);
    - special tokens: BOS and EOS swapped, BOS always added; here the GGUF's ids and add_bos/add_eos;
      CONTROL and UNKNOWN tokens are special, USER_DEFINED ones are matched in the raw text
      (normalized=False, as llama.cpp partitions them before tokenizing), BYTE ones are never
      added tokens;
    - fuse_unk: on; llama.cpp emits one unknown token per character.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import GemmaTokenizerFast, LlamaTokenizerFast

    tokens, scores, types = list(meta["tokens"]), [float(s) for s in meta["scores"]], list(meta["token_type"])
    unk_id = meta.get("unknown_token_id")
    model = models.BPE({text: index for index, text in enumerate(tokens)}, sentencepiece_merges(tokens, scores),
                       unk_token=tokens[int(unk_id)] if unk_id is not None else None,
                       fuse_unk=False, byte_fallback=BYTE in types)
    tokenizer = Tokenizer(model)
    replace = normalizers.Replace(" ", _SPACE)
    add_space_prefix = _flag(meta, "add_space_prefix", True)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), replace]) if add_space_prefix else replace
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(types) if kind in (CONTROL, UNKNOWN)])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind in enumerate(types) if kind == USER_DEFINED])

    def token(key: str) -> str | None:
        return tokens[int(meta[key])] if meta.get(key) is not None else None

    # The class name tells the runtimes' tokenizers (onnxruntime-extensions) whether a space prefix is added.
    tokenizer_class = LlamaTokenizerFast if add_space_prefix else GemmaTokenizerFast
    return tokenizer_class(
        tokenizer_object=tokenizer,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id") or token("eos_token_id"),
        add_bos_token=_flag(meta, "add_bos_token", True),
        add_eos_token=_flag(meta, "add_eos_token", False),
        **({"legacy": False} if add_space_prefix else {}),
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get("context_length") or 8192),
        chat_template=meta.get("chat_template"),
    )
