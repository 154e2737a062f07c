"""Speculative decoding (prompt lookup, draft model): greedy output must not change, and runners or
batch sizes that cannot do it are refused before any work.

The model is the untied random Llama (its greedy text depends on the prompt); the draft is another
random Llama with the same tokenizer, so it proposes wrong candidates too and rejection is exercised.
"""

from __future__ import annotations

import pytest

from llmopt import api
from llmopt.cli.main import main
from llmopt.errors import UsageError
from llmopt.recipe import resolve
from llmopt.runners.base import SamplingConfig, Speculation
from tests._hardening import exported_onnx
from tests.conftest import PROMPTS, build_untied_llama

GREEDY = SamplingConfig(max_new_tokens=24)


@pytest.fixture(scope="module")
def draft_llama(tiny_llama, tmp_path_factory):
    return build_untied_llama(tiny_llama, tmp_path_factory.mktemp("draft-llama"), seed=2)


def greedy_tokens(runner, speculation: Speculation | None) -> list[list[int]]:
    from llmopt import generation

    runner.set_speculation(speculation)
    return [result.token_ids for result in generation.generate(runner, PROMPTS, GREEDY, chat=True)]


# -- the contract ---------------------------------------------------------------------------------


def test_speculation_checks_its_fields():
    assert Speculation("prompt-lookup", 3).label == "prompt-lookup:3"
    assert Speculation("draft", 5, "/x/smol-ov-int4").label == "draft:smol-ov-int4:5"
    with pytest.raises(UsageError, match="accepted: prompt-lookup, draft"):
        Speculation("medusa", 3)
    with pytest.raises(UsageError, match="at least 1"):
        Speculation("prompt-lookup", 0)
    with pytest.raises(UsageError, match="draft"):
        Speculation("draft", 3)
    with pytest.raises(UsageError, match="draft"):
        Speculation("prompt-lookup", 3, "/x/draft")


# -- PyTorch ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pytorch_runner(untied_llama):
    from llmopt.runners.pytorch import PyTorchRunner

    runner = PyTorchRunner.from_checkpoint(untied_llama, batch_size=1, sequence_length=96, threads=1)
    yield runner
    runner.close()


def test_pytorch_speculation_keeps_greedy_output(pytorch_runner, draft_llama, untied_llama):
    plain = greedy_tokens(pytorch_runner, None)
    assert greedy_tokens(pytorch_runner, Speculation("prompt-lookup", 3)) == plain
    assert greedy_tokens(pytorch_runner, Speculation("draft", 4, str(draft_llama))) == plain
    assert greedy_tokens(pytorch_runner, Speculation("draft", 4, str(untied_llama))) == plain  # every candidate accepted
    pytorch_runner.set_speculation(None)
    assert pytorch_runner.speculation is None and pytorch_runner._draft_model is None


def test_pytorch_refusals(untied_llama, tmp_path):
    from llmopt.runners.pytorch import PyTorchRunner

    runner = PyTorchRunner.from_checkpoint(untied_llama, batch_size=1, sequence_length=96, threads=1)
    with pytest.raises(UsageError, match="not a checkpoint directory"):
        runner.set_speculation(Speculation("draft", 3, str(tmp_path)))
    assert runner.speculation is None  # a refused setting leaves the runner as it was
    static = PyTorchRunner.from_checkpoint(untied_llama, batch_size=1, sequence_length=96, mode="static", threads=1)
    with pytest.raises(UsageError, match="eager"):
        static.set_speculation(Speculation("prompt-lookup", 3))
    batched = PyTorchRunner.from_checkpoint(untied_llama, batch_size=2, sequence_length=96, threads=1)
    with pytest.raises(UsageError, match="batch size 1"):
        batched.set_speculation(Speculation("prompt-lookup", 3))


# -- runners that cannot, and the CLI -----------------------------------------------------------


@pytest.mark.onnx
def test_onnx_runner_refuses_with_the_alternative(tiny_llama, tmp_path_factory, capsys):
    path = exported_onnx(tiny_llama, tmp_path_factory)
    assert main(["run", str(path), "hello", "--prompt-lookup", "3"]) == 2
    err = capsys.readouterr().err
    assert "onnx runner does not support prompt-lookup decoding" in err and "openvino" in err


def test_run_refuses_two_candidate_sources(tiny_llama, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("any")
    assert main(["run", str(path), "hello", "--prompt-lookup", "3", "--draft", str(path)]) == 2
    assert "choose one" in capsys.readouterr().err


# -- OpenVINO (openvino-genai's prompt_lookup and draft_model pipelines) ----------------------------


def export_openvino(model, tmp_path_factory, name: str):
    pytest.importorskip("openvino_genai")
    output = tmp_path_factory.mktemp("spec-openvino") / name
    recipe = resolve(None, {"model": str(model), "target": "openvino", "shapes.batch_size": 1,
                            "shapes.sequence_length": 96})
    api.export(recipe, output)
    return output


@pytest.mark.openvino
def test_openvino_speculation_keeps_greedy_output(untied_llama, draft_llama, tmp_path_factory, capsys):
    model = export_openvino(untied_llama, tmp_path_factory, "model")
    draft = export_openvino(draft_llama, tmp_path_factory, "draft")
    runner = api.open_runner(model)
    try:
        plain = greedy_tokens(runner, None)
        assert greedy_tokens(runner, Speculation("prompt-lookup", 3)) == plain
        assert greedy_tokens(runner, Speculation("draft", 4, str(draft))) == plain
        with pytest.raises(UsageError, match="not an llmopt artifact"):
            runner.set_speculation(Speculation("draft", 4, str(draft_llama)))
    finally:
        runner.close()
    # The CLI path streams the same text as plain greedy.
    assert main(["run", str(model), PROMPTS[1], "--max-new-tokens", "12", "--temperature", "0", "--json"]) == 0
    plain_out = capsys.readouterr().out
    assert main(["run", str(model), PROMPTS[1], "--max-new-tokens", "12", "--temperature", "0", "--json",
                 "--draft", str(draft)]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["token_ids"] == json.loads(plain_out)["token_ids"]
