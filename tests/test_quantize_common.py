"""The quantization logic every target shares: group sizes, thresholds, calibration text, errors, CLI flags.

All pure or nearly so: no backend import, no export.
"""

from __future__ import annotations

import json
import time

import pytest

from llmopt import quantize, recipe
from llmopt.artifact import Manifest
from llmopt.cli.main import main
from llmopt.errors import RecipeError, UsageError
from llmopt.quantize import calibration
from llmopt.validation import validation_text

SMOLLM2_SIZES = {"hidden_size": 576, "attention output (heads x head_dim)": 576, "intermediate_size": 1536}


def make_recipe(**overrides) -> recipe.Recipe:
    return recipe.resolve(None, {"model.id": "some/model", "target": "openvino", **overrides})


# -- group sizes ------------------------------------------------------------------------------


def test_group_size_default_divides_smollm2():
    assert quantize.choose_group_size(None, SMOLLM2_SIZES) == 64  # 128 does not divide 576


def test_group_size_default_is_128_where_it_divides():
    assert quantize.choose_group_size(None, {"hidden_size": 4096, "intermediate_size": 11008}) == 128


def test_group_size_that_does_not_divide_names_the_working_ones():
    with pytest.raises(RecipeError) as caught:
        quantize.choose_group_size(128, SMOLLM2_SIZES)
    message = str(caught.value)
    assert "quantization.group_size 128" in message and "576" in message
    assert "accepted: 64, 32, 16, -1" in message


def test_group_size_explicit_and_per_channel_pass():
    assert quantize.choose_group_size(32, SMOLLM2_SIZES) == 32
    assert quantize.choose_group_size(-1, SMOLLM2_SIZES) == -1


def test_matmul_input_sizes_from_config():
    config = {"hidden_size": 576, "num_attention_heads": 9, "head_dim": 64, "intermediate_size": 1536}
    assert quantize.matmul_input_sizes(config) == SMOLLM2_SIZES


def test_group_size_zero_is_a_recipe_error():
    with pytest.raises(RecipeError, match="quantization.group_size"):
        make_recipe(**{"quantization.group_size": 0})


# -- validation thresholds --------------------------------------------------------------------


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_default_thresholds_per_format(weight_format):
    resolved = quantize.with_default_thresholds(make_recipe(**{"quantization.weight_format": weight_format}))
    expected = quantize.DEFAULT_THRESHOLDS[weight_format]
    assert resolved.validation.min_top1_agreement == expected["min_top1_agreement"]
    assert resolved.validation.max_mean_kl == expected["max_mean_kl"]
    assert expected["min_top1_agreement"] < recipe.Validation().min_top1_agreement  # looser than fp32's


def test_explicit_thresholds_are_kept():
    given = make_recipe(**{"quantization.weight_format": "int4", "validation.min_top1_agreement": 0.5})
    resolved = quantize.with_default_thresholds(given)
    assert resolved.validation.min_top1_agreement == 0.5
    assert resolved.validation.max_mean_kl == quantize.DEFAULT_THRESHOLDS["int4"]["max_mean_kl"]


def test_fp_recipe_keeps_fp_thresholds():
    given = make_recipe()
    assert quantize.with_default_thresholds(given) is given


# -- errors -----------------------------------------------------------------------------------


def test_target_without_quantization_is_a_recipe_error():
    with pytest.raises(RecipeError, match="accepted targets: openvino, onnx"):
        quantize.backend("neuron")


def _manifest(**fields) -> Manifest:
    base = dict(target="openvino", recipe={}, source={}, backend_versions={}, shapes={"batch_size": 1, "sequence_length": 64},
                precision="fp32", quantization={"weight_format": "none"})
    base.update(fields)
    return Manifest(**base)


def test_already_quantized_source_is_refused():
    with pytest.raises(RecipeError, match="already quantized"):
        quantize.check_source(_manifest(quantization={"weight_format": "int4"}), make_recipe())


def test_static_source_is_refused():
    with pytest.raises(RecipeError, match="static"):
        quantize.check_source(_manifest(shapes={"batch_size": 1, "sequence_length": 64, "static": True}), make_recipe())


# -- calibration text -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "chat", "pydoc", "auto"])
def test_shipped_sets_resolve_offline(name):
    samples = calibration.load(name)
    assert len(samples) >= 48
    assert all(sample.render() for sample in samples)


def test_shipped_sets_do_not_overlap_validation_text():
    # Nothing is dropped by the overlap filter: the shipped text itself is disjoint from validation.txt.
    raw = calibration._chat_samples() + calibration._pydoc_samples()
    assert not [sample for sample in raw if calibration.overlaps_validation(sample.render())]
    validation_words = set(validation_text().split())
    assert validation_text().strip() not in "\n".join(sample.render() for sample in raw)
    assert len(validation_words) > 50


def test_overlapping_samples_are_dropped(tmp_path):
    path = tmp_path / "mine.txt"
    leaked = validation_text().split("\n\n")[1]
    path.write_text(f"A first sample about gardens and tomatoes in the summer.\n\n{leaked}\n")
    samples = calibration.load(str(path))
    assert [sample.text for sample in samples] == ["A first sample about gardens and tomatoes in the summer."]


def test_local_jsonl_formats(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"text": "plain text"},
        {"prompt": "a question", "response": "an answer"},
        "a bare string",
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    samples = calibration.load(str(path))
    assert [sample.messages is not None for sample in samples] == [True, False, True, False]
    assert samples[2].render() == "user: a question\nassistant: an answer"


def test_bad_jsonl_line_names_it(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(RecipeError, match="line 2"):
        calibration.load(str(path))


def test_hub_dataset_name_is_a_quick_one_line_error():
    started = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        calibration.load("HuggingFaceH4/ultrachat_200k")
    assert time.perf_counter() - started < 5
    assert "\n" not in str(caught.value)
    assert "accepted: default, chat, pydoc" in str(caught.value)


def test_missing_local_file_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        calibration.load(str(tmp_path / "nope.txt"))


def test_texts_cycle_and_are_deterministic():
    first = calibration.texts("chat", 100, tokenizer=None)
    assert len(first) == 100 and first == calibration.texts("chat", 100, tokenizer=None)
    assert first[0] == first[len(calibration.load("chat"))]


def test_pydoc_prefix_covers_many_topics():
    head = [sample.text.splitlines()[0] for sample in calibration.load("pydoc")[:32]]
    assert len(set(head)) > 20  # spread over the reference, not 32 paragraphs of one topic


# -- CLI flags map onto recipe fields ---------------------------------------------------------


def test_cli_flags_map_onto_recipe(capsys):
    code = main([
        "quantize", "-m", "some/model", "--target", "openvino", "--weight-format", "int4", "--group-size", "32",
        "--sym", "--ratio", "0.8", "--no-awq", "--scale-estimation", "--dataset", "my prompts.txt",
        "--num-samples", "16", "--kv-cache", "u8", "--batch-size", "4", "--set", "quantization.ratio=0.9",
        "--dry-run", "--json",
    ])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    q = plan["recipe"]["quantization"]
    assert q["weight_format"] == "int4" and q["group_size"] == 32 and q["symmetric"] is True
    assert q["ratio"] == 0.9  # --set wins over the flag
    assert q["awq"] is False and q["scale_estimation"] is True
    assert q["dataset"] == "my prompts.txt" and q["num_samples"] == 16 and q["kv_cache"] == "u8"
    assert plan["recipe"]["shapes"]["batch_size"] == 4


def test_cli_without_weight_format_is_a_usage_error(tmp_path, capsys):
    code = main(["quantize", "-m", "some/model", "--target", "openvino", "-o", str(tmp_path / "out")])
    assert code == 2
    assert "weight_format" in capsys.readouterr().err


def test_cli_artifact_source_refuses_shape_flags(tmp_path, capsys):
    source = tmp_path / "art"
    source.mkdir()
    (source / "llmopt.json").write_text("{}")
    code = main(["quantize", str(source), "-o", str(tmp_path / "out"), "--batch-size", "4", "--weight-format", "int8"])
    assert code == 2
    assert "keeps its model, target and shapes" in capsys.readouterr().err


def test_api_quantize_needs_a_weight_format(tmp_path):
    from llmopt import api

    with pytest.raises(UsageError, match="nothing to quantize"):
        api.quantize(tmp_path / "out", recipe=make_recipe())
