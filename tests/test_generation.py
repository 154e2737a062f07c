"""Shared generation logic and parity metrics, on the PyTorch runner and the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from llmopt import generation, validation
from llmopt.errors import PromptTooLongError, UsageError
from llmopt.runners.base import SamplingConfig
from llmopt.runners.pytorch import PyTorchRunner


@pytest.fixture(scope="module")
def runner(tiny_llama):
    return PyTorchRunner.from_checkpoint(tiny_llama, batch_size=2, sequence_length=48, threads=1)


def test_chat_template_applied_unless_raw(runner):
    chat_ids = generation.encode_prompt(runner.tokenizer, "hi", chat=True)
    raw_ids = generation.encode_prompt(runner.tokenizer, "hi", chat=False)
    im_start = runner.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert chat_ids[0] == im_start and chat_ids.count(im_start) == 2  # user turn + generation prompt
    assert im_start not in raw_ids


def test_batches_split_and_padded_rows_dropped(runner):
    prompts = ["one", "two words", "three little words"]
    results = generation.generate(runner, prompts, SamplingConfig(max_new_tokens=5), chat=False)
    assert [r.prompt for r in results] == prompts
    single = [generation.generate(runner, [p], SamplingConfig(max_new_tokens=5), chat=False)[0] for p in prompts]
    assert [r.token_ids for r in results] == [r.token_ids for r in single]  # batching does not change greedy output


def test_stream_matches_final_text(runner):
    pieces: list[str] = []
    result = generation.generate(runner, ["Héllo wörld"], SamplingConfig(max_new_tokens=12), chat=False,
                                 on_text=lambda index, text: pieces.append(text))[0]
    assert "".join(pieces) == result.text


def test_length_limit_reports_finish_reason(runner):
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = generation.encode_prompt(runner.tokenizer, prompt, chat=False)
    runner.eos_token_ids = set()  # the random model may emit eos early; this test is about the length limit
    try:
        result = generation.generate(runner, [prompt], SamplingConfig(max_new_tokens=500), chat=False)[0]
    finally:
        runner.eos_token_ids = {runner.tokenizer.eos_token_id}
    assert result.finish_reason == "length"
    assert result.prompt_tokens + len(result.token_ids) == runner.sequence_length
    assert result.prompt_tokens == len(ids)


def test_prompt_too_long_refused_before_work(runner):
    with pytest.raises(PromptTooLongError, match=r"at most 47") as error:
        generation.generate(runner, ["fox " * 200], SamplingConfig(), chat=False)
    assert "--sequence-length" in error.value.hint


def test_prompt_at_limit_accepted(runner):
    ids = list(range(20, 20 + runner.sequence_length - 1))
    generation.check_prompt_length(ids, runner.sequence_length)
    with pytest.raises(PromptTooLongError):
        generation.check_prompt_length(ids + [20], runner.sequence_length)


def test_empty_prompts_refused(runner):
    with pytest.raises(UsageError, match="no prompt"):
        generation.generate(runner, [], SamplingConfig())
    with pytest.raises(UsageError, match="empty"):
        generation.check_prompt_length([], 10)


def test_sampling_is_seeded(runner):
    config = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    first = generation.generate(runner, ["fox"], config, chat=False)[0].token_ids
    again = generation.generate(runner, ["fox"], config, chat=False)[0].token_ids
    assert first == again


def test_compare_identical_and_different():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 50)).astype(np.float32)
    ids = list(rng.integers(0, 50, size=16))
    same = validation.compare(logits, logits.copy(), ids)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["perplexity"] == pytest.approx(same["reference_perplexity"])
    other = validation.compare(logits, rng.normal(size=(16, 50)).astype(np.float32), ids)
    assert other["top1_agreement"] < 0.5 and other["mean_kl"] > 0.1


def test_teacher_forced_logits_match_generation(runner):
    ids = generation.encode_prompt(runner.tokenizer, "fox jumps", chat=False)
    logits = runner.logits(ids)
    assert logits.shape == (len(ids), len(runner.tokenizer))
    greedy = generation.generate(runner, ["fox jumps"], SamplingConfig(max_new_tokens=1), chat=False)[0]
    assert greedy.token_ids[0] == int(logits[-1].argmax())
