"""Fuzzing the two inputs users type: recipes (and the flags over them) and prompts.

Whatever goes in, the CLI answers with exit 0, or exit 2 and one line on stderr (plus an optional
hint); never a traceback. Bounded: a fixed number of examples, no deadline, no saved database.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmopt.cli.main import main
from llmopt.registry import TARGETS

from tests._hardening import assert_one_line_error, exported_onnx

FUZZ = settings(max_examples=80, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROMPT_FUZZ = settings(FUZZ, max_examples=50)

VALID = {
    "model": {"id": "PLACEHOLDER", "revision": None, "trust_remote_code": False},
    "target": "onnx",
    "shapes": {"batch_size": 1, "sequence_length": 64, "static": False},
    "precision": {"dtype": "fp32"},
    "quantization": {"weight_format": "none", "group_size": None, "ratio": 1.0, "algorithm": "auto"},
    "openvino": {"device": "CPU", "ov_config": {}},
    "onnx": {"provider": "cpu", "opset": None},
    "neuron": {"num_cores": 2, "compiler_args": {}},
    "tensorrt": {"gpu": None, "tensor_parallel_size": 1, "builder_args": {}},
    "generation": {"max_new_tokens": 16, "temperature": 0.0, "top_k": 50, "top_p": 1.0},
    "validation": {"enabled": True, "max_tokens": 64},
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["fp16", "int4", "int8", "openvino", "neuron", "tensorrt", "onnx", "CPU", "GPU", "awq", "-1",
                     "1e9", "true", "null", "~", "2001-01-01", "0x10", "\u2028", "名字", "a\nb"]),
)
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=8)
keys = st.one_of(st.text(max_size=12), st.sampled_from(
    ["model", "target", "shapes", "batch_size", "sequence_length", "static", "dtype", "weight_format", "group_size",
     "ratio", "num_cores", "gpu", "ov_config", "id", "revision", "generation", "validation", "quantization"]))


@st.composite
def mutated_recipes(draw, model_id: str):
    recipe = copy.deepcopy(VALID)
    recipe["model"]["id"] = model_id
    recipe["target"] = draw(st.sampled_from(TARGETS))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = _random_path(draw, recipe)
        parent, key = path
        action = draw(st.sampled_from(["replace", "add", "delete", "rename"]))
        if action == "replace" and key in parent:
            parent[key] = draw(junk)
        elif action == "add":
            parent[draw(keys)] = draw(junk)
        elif action == "delete" and key in parent:
            del parent[key]
        elif action == "rename" and key in parent:
            parent[draw(keys)] = parent.pop(key)
    return recipe


def _random_path(draw, node):
    """A (parent dict, key) somewhere in the nested recipe."""
    parent = node
    while True:
        key = draw(st.sampled_from(sorted(parent, key=str))) if parent else draw(keys)
        child = parent.get(key)
        if not isinstance(child, dict) or not child or draw(st.booleans()):
            return parent, key
        parent = child


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def assert_clean_outcome(code: int, err: str, allowed=(0, 2)) -> None:
    assert "Traceback" not in err, err
    assert code in allowed, (code, err)
    if code != 0:
        assert_one_line_error(err)


# -- recipes --------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_mutated_recipe_dry_run(tiny_llama, data):
    recipe = data.draw(mutated_recipes(str(tiny_llama)))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
        code, out, err = run_cli(["-q", "export", "--config", str(path), "--dry-run"])
    assert_clean_outcome(code, err)
    if code == 0:
        assert yaml.safe_load(out)["target"] in TARGETS


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_recipe_text(text):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        code, _, err = run_cli(["-q", "export", "--config", str(path), "--dry-run"])
    assert_clean_outcome(code, err, allowed=(2,))  # no text without a model and a target is a valid recipe


set_items = st.lists(
    st.tuples(st.lists(keys, min_size=1, max_size=3).map(".".join), st.one_of(st.text(max_size=20), scalars.map(str))),
    max_size=3,
).map(lambda items: [arg for key, value in items for arg in ("--set", f"{key}={value}")])


@FUZZ
@given(target=st.one_of(st.sampled_from(TARGETS), st.text(max_size=10)),
       batch_size=st.one_of(st.none(), st.integers(min_value=-5, max_value=5000)),
       sequence_length=st.one_of(st.none(), st.integers(min_value=-5, max_value=2_000_000)),
       dtype=st.one_of(st.none(), st.sampled_from(["fp32", "fp16", "bf16", "int4", ""]), st.text(max_size=6)),
       static=st.sampled_from([None, "--static", "--dynamic"]),
       sets=set_items)
def test_flags_over_a_recipe(tiny_llama, target, batch_size, sequence_length, dtype, static, sets):
    args = ["-q", "export", "-m", str(tiny_llama), f"--target={target}", "--dry-run", *sets]
    if batch_size is not None:
        args.append(f"--batch-size={batch_size}")
    if sequence_length is not None:
        args.append(f"--sequence-length={sequence_length}")
    if dtype is not None:
        args.append(f"--dtype={dtype}")
    if static:
        args.append(static)
    code, _, err = run_cli(args)
    assert_clean_outcome(code, err)


# -- prompts on a real artifact -------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_artifact(tiny_llama, tmp_path_factory):
    return exported_onnx(tiny_llama, tmp_path_factory)  # sequence_length 32: prompts of at most 31 tokens


@pytest.fixture(scope="module")
def tokenizer(onnx_artifact):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(onnx_artifact)


@PROMPT_FUZZ
@given(prompt=st.text(max_size=120), raw=st.booleans())
def test_any_unicode_prompt(onnx_artifact, prompt, raw):
    args = ["-q", "run", str(onnx_artifact), "--max-new-tokens", "2", *(["--raw"] if raw else []), "--", prompt]
    code, out, err = run_cli(args)
    assert_clean_outcome(code, err)
    if code == 2:
        assert "tokens but the artifact accepts at most 31" in err or "empty" in err


@pytest.mark.parametrize("raw", [True, False])
def test_empty_prompt_refused(onnx_artifact, raw):
    code, _, err = run_cli(["-q", "run", str(onnx_artifact), *(["--raw"] if raw else []), "--", ""])
    assert code == 2
    assert "empty" in assert_one_line_error(err)


def _prompt_of(tokenizer, tokens: int) -> str:
    """A raw prompt that tokenizes to exactly ``tokens`` tokens ('~' never merges in the tiny vocabulary)."""
    prompt = "~" * tokens
    assert len(tokenizer.encode(prompt, add_special_tokens=True)) == tokens
    return prompt


def test_prompt_at_the_limit_accepted_one_past_refused(onnx_artifact, tokenizer):
    limit = 31  # sequence_length 32 minus the one token it must generate
    code, out, err = run_cli(["-q", "run", str(onnx_artifact), "--raw", "--json", _prompt_of(tokenizer, limit)])
    assert code == 0, err
    import json

    result = json.loads(out)
    assert result["prompt_tokens"] == limit and len(result["token_ids"]) == 1 and result["finish_reason"] == "length"
    code, _, err = run_cli(["-q", "run", str(onnx_artifact), "--raw", _prompt_of(tokenizer, limit + 1)])
    assert code == 2
    assert f"prompt 1 has {limit + 1} tokens but the artifact accepts at most {limit}" in assert_one_line_error(err)
