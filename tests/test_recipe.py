"""Recipe parsing, overrides and error messages (no backend needed)."""

from __future__ import annotations

import pytest

from llmopt import recipe as recipe_module
from llmopt.errors import RecipeError
from llmopt.recipe import resolve
from tests.conftest import write_recipe

BASE = {"model": {"id": "some/model"}, "target": "onnx"}


def test_defaults_fill_every_section():
    recipe = resolve(None, {"model.id": "some/model", "target": "openvino"})
    assert recipe.shapes.batch_size == 1
    assert recipe.precision.dtype == "fp32"
    assert recipe.quantization.weight_format == "none"
    assert recipe.generation.temperature is None  # unset: the checkpoint's generation_config.json decides at run time


def test_flags_override_file_field_by_field(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**BASE, "shapes": {"batch_size": 2, "sequence_length": 256}})
    recipe = resolve(path, {"shapes.sequence_length": 1024, "shapes.batch_size": None})
    assert recipe.shapes.sequence_length == 1024
    assert recipe.shapes.batch_size == 2  # a flag that was not given leaves the file's value


def test_set_parses_values_as_yaml():
    overrides = recipe_module.parse_set_options(["quantization.group_size=64", "shapes.static=true", "precision.dtype=fp16"])
    assert overrides == {"quantization.group_size": 64, "shapes.static": True, "precision.dtype": "fp16"}
    recipe = resolve(None, {**{"model.id": "m", "target": "onnx"}, **overrides})
    assert recipe.quantization.group_size == 64 and recipe.shapes.static is True


def test_model_shorthand(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"model": "some/model", "target": "onnx"})
    assert resolve(path).model.id == "some/model"


def test_unknown_field_names_field_and_accepted(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**BASE, "shapes": {"sequence_lenght": 64}})
    with pytest.raises(RecipeError) as error:
        resolve(path)
    message = str(error.value)
    assert "shapes.sequence_lenght" in message and "unknown field" in message
    assert "sequence_length" in message and "batch_size" in message
    assert error.value.exit_code == 2


def test_wrong_type_names_field():
    with pytest.raises(RecipeError, match=r"shapes.batch_size.*got 'four'"):
        resolve(None, {"model.id": "m", "target": "onnx", "shapes.batch_size": "four"})


def test_unknown_target_lists_targets():
    with pytest.raises(RecipeError, match=r"target.*accepted: onnx, openvino, neuron, tensorrt"):
        resolve(None, {"model.id": "m", "target": "tpu"})


def test_bad_dtype_lists_choices():
    with pytest.raises(RecipeError, match=r"precision.dtype.*'fp32', 'fp16' or 'bf16'"):
        resolve(None, {"model.id": "m", "target": "onnx", "precision.dtype": "fp64"})


def test_missing_model_is_named():
    with pytest.raises(RecipeError, match=r"field 'model': required"):
        resolve(None, {"target": "onnx"})


@pytest.mark.parametrize("text, expected", [("a: [1, 2", "not valid YAML"), ("- just\n- a list\n", "must be a mapping")])
def test_broken_yaml_is_one_line(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=expected) as error:
        resolve(path)
    assert "\n" not in str(error.value)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file 'nope.yaml' not found"):
        resolve("nope.yaml")


def test_set_needs_equals():
    with pytest.raises(RecipeError, match="expected FIELD=VALUE"):
        recipe_module.parse_set_options(["shapes.batch_size"])


def test_set_into_a_value_is_an_error():
    with pytest.raises(RecipeError, match="'target' is a value, not a section"):
        resolve(None, {"model.id": "m", "target": "onnx", "target.x": 1})


def test_round_trip_through_yaml(tmp_path):
    recipe = resolve(None, {"model.id": "m", "target": "openvino", "shapes.batch_size": 4})
    path = tmp_path / "again.yaml"
    path.write_text(recipe.to_yaml())
    assert resolve(path) == recipe
