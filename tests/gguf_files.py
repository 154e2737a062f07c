"""Tiny GGUF files written here, for the conversion tests: nothing is downloaded.

``sentencepiece_gguf`` trains a SentencePiece BPE vocabulary of a few hundred pieces (byte
fallback and split digits, like Llama, Mistral and Gemma) and writes it, with random weights for a
2-layer llama (hidden 64), into a GGUF laid out the way llama.cpp's convert_hf_to_gguf.py lays out
Llama-2: token types from the SentencePiece model, Q/K rows permuted for llama.cpp's rope.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

USER_DEFINED = ["<|user|>", "<|assistant|>"]
CONTROL = ["<start_of_turn>", "<end_of_turn>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                 "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Compilers turn programs into machine code; runtimes execute them quickly.",
    "Héllo wörld, naïve café — crème brûlée, señor, Zürich, façade.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "def generate(tokens):\n    return model(tokens)  # greedy\n\tindent = {'a': [1, 2, 3]}\n",
    "Numbers 0123456789, 3.14159, 2024-06-01 and 1,000,000 dollars!",
    "Привет, мир! Γειά σου Κόσμε. مرحبا بالعالم",
    "  two leading spaces,   three inside,\n\nblank lines and trailing  ",
]


def train_sentencepiece(vocab_size: int = 900) -> bytes:
    """A serialized SentencePiece BPE model (ModelProto) trained on TRAINING_TEXT."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 20), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_by_whitespace=True, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        control_symbols=CONTROL, user_defined_symbols=USER_DEFINED, hard_vocab_limit=False,
        minloglevel=2, num_threads=1,
    )
    return model.getvalue()


def _pieces(model_proto: bytes) -> tuple[list[str], list[float], list[int]]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    # SentencePiece's piece types and GGUF's token types share their numbers (NORMAL 1 ... BYTE 6).
    return ([p.piece for p in proto.pieces], [p.score for p in proto.pieces], [int(p.type) for p in proto.pieces])


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute: what transformers' loader reverses.
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(path: Path, tokens: list[str], scores: list[float], token_types: list[int], *,
                     add_space_prefix: bool = True, add_bos: bool = True, add_eos: bool = False,
                     tokenizer_model: str = "llama", architecture: str = "llama", seed: int = 0) -> Path:
    """A llama GGUF with the given vocabulary and random float32 weights (2 layers, hidden 64, 4/2 heads)."""
    import gguf

    hidden, ffn, layers, heads, kv_heads = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{tokenizer_model}")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(3)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template(CHAT_TEMPLATE)

    vocab = len(tokens)
    writer.add_tensor("token_embd.weight", weight(vocab, hidden, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", weight(vocab, hidden, scale=0.5))
    for layer in range(layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", _permute(weight(heads * head_dim, hidden), heads))
        writer.add_tensor(f"{prefix}.attn_k.weight", _permute(weight(kv_heads * head_dim, hidden), kv_heads))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sentencepiece_ggufs(directory: Path) -> dict[str, Path]:
    """Two flavours of one trained vocabulary: Llama-style (space prefix, BOS) and Gemma-style (neither prefix)."""
    tokens, scores, token_types = _pieces(train_sentencepiece())
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "llama": write_llama_gguf(directory / "tiny-sp-llama.gguf", tokens, scores, token_types),
        "gemma": write_llama_gguf(directory / "tiny-sp-gemma.gguf", tokens, scores, token_types,
                                  add_space_prefix=False, add_eos=True, seed=1),
    }
