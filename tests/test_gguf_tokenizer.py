"""GGUF tokenizers converted by llmopt encode exactly as llama.cpp does for the same file.

The SentencePiece GGUFs are written here (tests/gguf_files.py: a vocabulary trained with the
sentencepiece package, random weights). llama.cpp's tokenizer is the reference, through
llama-cpp-python (``make install-peer``; CI installs it); the byte-level BPE check uses the real
SmolLM2 GGUF (``make model``) and is marked ``slow``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llmopt import sources
from llmopt.cli.main import main
from llmopt.errors import UsageError
from tests.gguf_files import CONTROL, USER_DEFINED, sentencepiece_ggufs, write_llama_gguf
from tests.test_sources import SPACES_BEFORE_DIGIT, _dummy_genai_dir

CODE = "def f(x):\n    return {'a': x**2}  # code\n"
BYTE_TOKEN_AS_TEXT = "<unk> and <0x41> as text"
PLAIN_TEXTS = [
    "Hello world",
    "digits 3.14159 and 2024, 1234567890",
    "  leading and trailing  ",
    "multiple   spaces\n\nnewlines\tand\ttabs\n",
    " \n\t ",
    "Héllo wörld, naïve café — crème brûlée, Zürich",
    "東京は日本の首都です。中文测试 서울은 한국",
    "emoji 🤖🚀 and 👍🏽 ✨",
    CODE,
]
SPECIAL_TEXTS = [
    "<s>special</s> as text",
    f"{CONTROL[0]}user\nhi{CONTROL[1]}\n{CONTROL[0]}model\n",
    f"a  {USER_DEFINED[0]}  b{USER_DEFINED[1]}c",
    BYTE_TOKEN_AS_TEXT,
]
TEXTS = PLAIN_TEXTS + SPECIAL_TEXTS + ["", " "]
FLAVOURS = ["llama", "gemma"]  # Llama-style: space prefix, BOS; Gemma-style: no prefix, BOS and EOS


def runtime_cases(known: dict[tuple[str, str], str]) -> list:
    """(flavour, text) for the runtimes' tokenizers; ``known`` maps a case to the runtime's own deviation."""
    return [pytest.param(flavour, text, marks=[pytest.mark.xfail(reason=known[flavour, text], strict=True)]
                         if (flavour, text) in known else [])
            for flavour in FLAVOURS for text in PLAIN_TEXTS + SPECIAL_TEXTS]


# openvino-tokenizers turns the text "<0x41>" into the byte token <0x41> (llama.cpp and HF spell it out).
OPENVINO_KNOWN = {(flavour, BYTE_TOKEN_AS_TEXT): "openvino-tokenizers reads '<0x41>' in text as a byte token"
                  for flavour in FLAVOURS}
# onnxruntime-extensions splits a run of spaces after a newline differently when a space prefix is added.
GENAI_KNOWN = {("llama", CODE): "onnxruntime-extensions splits space runs after a newline on its own"}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    return sentencepiece_ggufs(tmp_path_factory.mktemp("sp-gguf"))


@pytest.fixture(scope="module")
def converted(ggufs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp-converted")
    return {flavour: sources.convert_gguf(path, root / flavour) for flavour, path in ggufs.items()}


@pytest.fixture(scope="module")
def hf_tokenizers(converted):
    from transformers import AutoTokenizer

    return {flavour: AutoTokenizer.from_pretrained(path) for flavour, path in converted.items()}


@pytest.fixture(scope="module")
def llama_cpp_vocabs(ggufs):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make install-peer")
    return {flavour: llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            for flavour, path in ggufs.items()}


def llama_cpp_ids(vocab, text: str) -> list[int]:
    # add_bos=True means "add the special tokens the GGUF asks for" (add_bos_token/add_eos_token).
    return vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)


# --------------------------------------------------------------------------- SentencePiece, against llama.cpp


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_encodes_as_llama_cpp(hf_tokenizers, llama_cpp_vocabs, flavour, text):
    assert hf_tokenizers[flavour].encode(text) == llama_cpp_ids(llama_cpp_vocabs[flavour], text)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_transformers_own_converter_differs_from_llama_cpp(ggufs, llama_cpp_vocabs, flavour):
    """Why llmopt rebuilds the tokenizer: transformers' GGUF converter, on the same file."""
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(ggufs[flavour].parent, gguf_file=ggufs[flavour].name)
    assert raw.eos_token == "<s>"  # the BOS token, not the GGUF's eos_token_id
    wrong = [text for text in TEXTS if raw.encode(text) != llama_cpp_ids(llama_cpp_vocabs[flavour], text)]
    assert SPECIAL_TEXTS[2] in wrong  # USER_DEFINED tokens are not split off


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_sentencepiece_decodes_back(hf_tokenizers, flavour, text):
    tokenizer = hf_tokenizers[flavour]
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sentencepiece_special_tokens_flags_and_template(converted, hf_tokenizers, flavour):
    from transformers import GenerationConfig

    tokenizer = hf_tokenizers[flavour]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 3)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tokenizer.encode("Hello")
    assert ids[0] == 1 and (ids[-1] == 2) == (flavour == "gemma")
    starts_with_space = tokenizer.convert_ids_to_tokens(ids[1]).startswith("\u2581")
    assert starts_with_space == (flavour == "llama")  # add_space_prefix: Gemma GGUFs set it false
    assert "<start_of_turn>" in tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[:2] == [1, tokenizer.convert_tokens_to_ids(CONTROL[0])]
    for config in (json.loads((converted[flavour] / "config.json").read_text()),
                   GenerationConfig.from_pretrained(converted[flavour]).to_dict()):
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)


# --------------------------------------------------------------------------- through the runtimes' tokenizers


@pytest.fixture(scope="module")
def openvino_tokenizers(hf_tokenizers):
    pytest.importorskip("openvino_tokenizers")
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    core = ov.Core()
    return {flavour: core.compile_model(convert_tokenizer(tokenizer), "CPU") for flavour, tokenizer in hf_tokenizers.items()}


@pytest.mark.openvino
@pytest.mark.parametrize("flavour, text", runtime_cases(OPENVINO_KNOWN))
def test_sentencepiece_through_openvino_tokenizers(openvino_tokenizers, hf_tokenizers, flavour, text):
    assert openvino_tokenizers[flavour]([text])["input_ids"][0].tolist() == hf_tokenizers[flavour].encode(text)


@pytest.fixture(scope="module")
def genai_tokenizers(converted, tmp_path_factory):
    og = pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx")
    return {flavour: og.Tokenizer(og.Model(str(_dummy_genai_dir(tmp_path_factory.mktemp(f"genai-{flavour}"), path))))
            for flavour, path in converted.items()}


@pytest.mark.onnx
@pytest.mark.parametrize("flavour, text", runtime_cases(GENAI_KNOWN))
def test_sentencepiece_through_onnxruntime_genai(genai_tokenizers, hf_tokenizers, flavour, text):
    # og.Tokenizer.encode adds no BOS/EOS (onnxruntime-genai's generator does not expect them there).
    assert genai_tokenizers[flavour].encode(text).tolist() == hf_tokenizers[flavour].encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------- refused files cost under a second


@pytest.mark.parametrize("tokenizer_model, architecture, field", [
    ("bert", "llama", "tokenizer model 'bert'"),
    ("rwkv", "llama", "tokenizer model 'rwkv'"),
    ("llama", "mamba", "architecture 'mamba'"),
])
def test_a_refused_gguf_is_one_line_in_under_a_second(tmp_path, tokenizer_model, architecture, field):
    tokens = ["<unk>", "<s>", "</s>", "<pad>", "a", "b"]
    gguf = write_llama_gguf(tmp_path / "refused.gguf", tokens, [0.0] * 6, [2, 3, 3, 3, 1, 1],
                            tokenizer_model=tokenizer_model, architecture=architecture)
    started = time.perf_counter()
    with pytest.raises(UsageError) as info:
        sources.resolve_model(str(gguf), None, False, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    assert "\n" not in message and field in message and "refused.gguf" in message and "supported:" in message
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("target", [pytest.param("onnx", marks=pytest.mark.onnx),
                                    pytest.param("openvino", marks=pytest.mark.openvino)])
def test_a_sentencepiece_gguf_exports_and_generates(ggufs, tmp_path, monkeypatch, capsys, target):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / f"sp-{target}"
    code = main(["-q", "export", "-m", str(ggufs["llama"]), "--target", target, "-o", str(out),
                 "--sequence-length", "64"])
    assert code == 0, capsys.readouterr().err  # the parity gate against PyTorch passed
    capsys.readouterr()
    assert main(["-q", "run", str(out), "Hello world", "--max-new-tokens", "8"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()


# --------------------------------------------------------------------------- byte-level BPE, the real SmolLM2 GGUF


SMOLLM2_GGUF = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory):
    """The real SmolLM2 GGUF's tokenizer, converted here by this code (not the weights), and llama.cpp's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make install-peer")
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is missing: run `make model`")
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    sources.fix_gguf_tokenizer(raw, sources._gguf_metadata(SMOLLM2_GGUF, vocabulary=True)).save_pretrained(directory)
    return (AutoTokenizer.from_pretrained(directory),
            llama_cpp.Llama(model_path=str(SMOLLM2_GGUF), vocab_only=True, verbose=False))


@pytest.mark.slow
@pytest.mark.parametrize("text", [*TEXTS, "<|im_start|>user\nhi<|im_end|>\n", SPACES_BEFORE_DIGIT.values[0]])
def test_smollm2_byte_level_bpe_encodes_as_llama_cpp(smollm2_gguf, text):
    tokenizer, vocab = smollm2_gguf
    assert tokenizer.encode(text) == llama_cpp_ids(vocab, text)
