"""The artifact contract, once for every target: export -> manifest -> load -> parity -> run -> verify -> corrupt.

Every target llmopt builds for is a row of ``TARGETS``; each test below runs for each row, so a new
target gets the whole contract by adding one line. The CPU targets (onnx, openvino and their static
graphs) run here on small random models: tiny_llama (its greedy text repeats a token) and
untied_llama (its greedy text depends on the whole context). The hardware targets (neuron, tensorrt,
onnx over the TensorRT execution provider) are in the same contract and skip with the reason where
their hardware is missing; what each target does beyond the contract stays in its own test file.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from llmopt import api, artifact, generation
from llmopt.cli.main import main
from llmopt.errors import ArtifactError, PromptTooLongError, UsageError
from llmopt.hardware import detect_gpus, neuron_device_present
from llmopt.runners.base import SamplingConfig
from tests._hardening import flip_byte, largest_file
from tests.conftest import PROMPTS, pytorch_results


def _modules(*names: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        for name in names:
            try:
                found = importlib.util.find_spec(name) is not None
            except ImportError:
                found = False
            if not found:
                return f"{name} is not installed"
        return None
    return missing


def _gpu_with(provider_check: Callable[[], str | None]) -> Callable[[], str | None]:
    def missing() -> str | None:
        return provider_check() or (None if detect_gpus() else "needs an NVIDIA GPU (nvidia-smi finds none)")
    return missing


def _ort_tensorrt() -> str | None:
    reason = _modules("onnxruntime")()
    if reason:
        return reason
    import onnxruntime

    return None if "TensorrtExecutionProvider" in onnxruntime.get_available_providers() else \
        "needs onnxruntime-gpu with the TensorRT execution provider (make install-gpu)"


def _neuron() -> str | None:
    if _modules("optimum.neuron")():
        return "needs optimum-neuron on an Inferentia/Trainium host (make install-neuron)"
    return None if neuron_device_present() else "needs a Neuron device (no /dev/neuron0)"


@dataclass(frozen=True)
class Target:
    name: str
    fields: dict  # recipe fields that select the target
    missing: Callable[[], str | None]  # why this machine cannot run it, or None
    marks: tuple = ()
    validates: bool = True  # the export's teacher-forced parity check runs on the export host
    extras: dict = field(default_factory=dict)


TARGETS = [
    Target("onnx", {"target": "onnx"}, _modules("onnxruntime_genai", "onnx"), (pytest.mark.onnx,)),
    Target("openvino", {"target": "openvino"}, _modules("openvino_genai", "optimum.intel"), (pytest.mark.openvino,)),
    Target("onnx-static", {"target": "onnx", "shapes.static": True}, _modules("onnxruntime", "onnx"), (pytest.mark.onnx,)),
    Target("openvino-static", {"target": "openvino", "shapes.static": True}, _modules("openvino", "onnx"),
           (pytest.mark.openvino,)),
    Target("onnx-tensorrt", {"target": "onnx", "shapes.static": True, "onnx.provider": "tensorrt"},
           _gpu_with(_ort_tensorrt), (pytest.mark.gpu, pytest.mark.tensorrt)),
    Target("tensorrt", {"target": "tensorrt", "precision.dtype": "fp16", "tensorrt.gather_context_logits": True},
           _gpu_with(lambda: None if _modules("tensorrt_llm")() is None else
                     "needs TensorRT-LLM (make install-tensorrt)"), (pytest.mark.tensorrt, pytest.mark.gpu)),
    Target("neuron", {"target": "neuron", "precision.dtype": "bf16", "neuron.num_cores": 2}, _neuron,
           (pytest.mark.neuron,), validates=False),
]
BY_NAME = {target.name: target for target in TARGETS}
EVERY_TARGET = [pytest.param(target.name, marks=list(target.marks), id=target.name) for target in TARGETS]


@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    """PyTorch (the reference) on one thread beside the runtimes, whose threads it would otherwise fight."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def built(build_artifact, tiny_llama, untied_llama):
    """built(target, "tiny" | "untied", batch_size, sequence_length) -> artifact path (skips where it cannot run)."""

    def build(name: str, model: str, batch_size: int, sequence_length: int) -> Path:
        target = BY_NAME[name]
        reason = target.missing()
        if reason:
            pytest.skip(f"{name}: {reason}")
        checkpoint = {"tiny": tiny_llama, "untied": untied_llama}[model]
        return build_artifact(checkpoint, **target.fields, **{"shapes.batch_size": batch_size,
                                                              "shapes.sequence_length": sequence_length})

    return build


def checkpoint_of(model: str, request) -> Path:
    return request.getfixturevalue({"tiny": "tiny_llama", "untied": "untied_llama"}[model])


# ------------------------------------------------------------------------------ export and manifest


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_export_writes_a_verified_manifest(name, built):
    path = built(name, "tiny", 1, 64)
    manifest = artifact.load(path)  # re-hashes every file
    target = BY_NAME[name]
    assert manifest.target == target.fields["target"]
    assert manifest.shapes == {"batch_size": 1, "sequence_length": 64, "static": bool(target.fields.get("shapes.static"))}
    assert manifest.files and all(len(digest) == 64 for digest in manifest.files.values())
    assert "tokenizer.json" in manifest.files and manifest.runtime.get("loader")
    assert manifest.backend_versions and all(manifest.backend_versions.values())
    if target.validates:
        assert manifest.validation["passed"] and manifest.validation["top1_agreement"] >= 0.99
    assert not list(path.parent.glob("*.partial-*"))


# ------------------------------------------------------------------------------ generation against PyTorch


@pytest.mark.parametrize("name", EVERY_TARGET)
@pytest.mark.parametrize("model, batch_size, sequence_length", [("tiny", 1, 64), ("untied", 1, 96), ("untied", 4, 96)])
def test_greedy_run_matches_pytorch(name, model, batch_size, sequence_length, built, request):
    path = built(name, model, batch_size, sequence_length)
    manifest = artifact.read_manifest(path)
    results = api.run(path, PROMPTS, temperature=0.0, max_new_tokens=24)
    expected = pytorch_results(checkpoint_of(model, request), manifest, PROMPTS, SamplingConfig(max_new_tokens=24))
    assert len({r.prompt_tokens for r in results}) == len(PROMPTS)
    for got, want in zip(results, expected):
        assert got.token_ids == want.token_ids, got.prompt
        assert got.finish_reason == want.finish_reason
        assert got.ttft_ms > 0
    if model == "untied":
        assert len(set(results[-1].token_ids)) > 3  # a context-dependent text, not one repeated token


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_teacher_forced_logits_match_pytorch_with_a_pinned_batch(name, built, untied_llama):
    from llmopt.runners.pytorch import PyTorchRunner

    token_ids = list(range(3, 99))  # the whole sequence_length
    runner = api.open_runner(built(name, "untied", 4, 96))
    try:
        logits = runner.logits(token_ids)
        again = runner.logits(token_ids[:10])  # state from the first call must not leak in
    finally:
        runner.close()
    expected = PyTorchRunner.from_checkpoint(untied_llama, threads=1).logits(token_ids)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(again, expected[:10], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_repetition_penalty_matches_pytorch(name, built, untied_llama):
    path = built(name, "untied", 4, 96)
    sampling = SamplingConfig(max_new_tokens=24, repetition_penalty=1.3)
    runner = api.open_runner(path)
    try:
        if name == "neuron":  # on-device sampling has none: refused, never ignored
            with pytest.raises(UsageError, match="repetition penalty is not available"):
                generation.generate(runner, PROMPTS, sampling, chat=False)
            return
        results = generation.generate(runner, PROMPTS, sampling, chat=False)
    finally:
        runner.close()
    expected = pytorch_results(untied_llama, runner.manifest, PROMPTS, sampling, chat=False)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_rows_stop_at_their_own_end_of_sequence(name, built, untied_llama):
    """A pinned batch runs to the end even when rows finish early (openvino-genai drops finished rows)."""
    from llmopt.runners.pytorch import PyTorchRunner

    runner = api.open_runner(built(name, "untied", 4, 96))
    reference = PyTorchRunner.from_checkpoint(untied_llama, batch_size=4, threads=1)
    batch = [generation.encode_prompt(runner.tokenizer, prompt, chat=False) for prompt in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=16)
    free = runner.generate(batch, sampling).sequences
    row_one = free[1].token_ids
    stop_at = next(i for i in range(2, len(row_one)) if row_one[i] not in row_one[:i])
    stop_token = row_one[stop_at]  # row 1 stops there; the other rows wherever they meet it
    runner.eos_token_ids = reference.eos_token_ids = {stop_token}
    streamed: dict[int, list[int]] = {}
    got = runner.generate(batch, sampling, on_token=lambda row, token: streamed.setdefault(row, []).append(token))
    want = reference.generate(batch, sampling)
    runner.close()
    assert got.sequences[1].token_ids == row_one[: stop_at + 1] and got.sequences[1].finish_reason == "stop"
    for row in range(4):
        assert got.sequences[row].token_ids == want.sequences[row].token_ids
        assert got.sequences[row].finish_reason == want.sequences[row].finish_reason
        assert streamed[row] == got.sequences[row].token_ids


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_rows_without_an_end_token_run_to_the_limit(name, built):
    runner = api.open_runner(built(name, "untied", 4, 96))
    runner.eos_token_ids = set()  # what a fixed-length benchmark does
    try:
        batch = [generation.encode_prompt(runner.tokenizer, prompt, chat=False) for prompt in PROMPTS]
        output = runner.generate(batch, SamplingConfig(max_new_tokens=40))
    finally:
        runner.close()
    for sequence in output.sequences:
        assert len(sequence.token_ids) == 40 and min(sequence.token_ids) >= 0 and sequence.finish_reason == "length"


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_a_batch_of_one_streams_while_generating(name, built):
    runner = api.open_runner(built(name, "untied", 1, 96))
    try:
        batch = [generation.encode_prompt(runner.tokenizer, PROMPTS[1], chat=False)]
        streamed: list[int] = []
        output = runner.generate(batch, SamplingConfig(max_new_tokens=12), on_token=lambda row, token: streamed.append(token))
    finally:
        runner.close()
    assert streamed == output.sequences[0].token_ids and len(streamed) > 1
    assert output.ttft_s > 0 and output.decode_s > 0


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_generation_reaching_sequence_length_stops_with_length(name, built):
    result = api.run(built(name, "tiny", 1, 64), ["hello"], temperature=0.0, max_new_tokens=1000)[0]
    assert result.finish_reason == "length"
    assert result.prompt_tokens + len(result.token_ids) == 64


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_prompt_longer_than_the_artifact_is_refused(name, built):
    path = built(name, "tiny", 1, 64)
    with pytest.raises(PromptTooLongError, match="at most 63"):
        api.run(path, ["fox " * 100], max_new_tokens=4)
    runner = api.open_runner(path)
    try:
        with pytest.raises(PromptTooLongError):
            runner.generate([[5] * 64], SamplingConfig(max_new_tokens=1))
        with pytest.raises(UsageError, match="exactly 1 rows"):
            runner.generate([[5], [6]], SamplingConfig(max_new_tokens=1))
    finally:
        runner.close()


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_sampling_is_seeded(name, built):
    path = built(name, "untied", 1, 96)
    runs = [api.run(path, ["Hi"], temperature=1.0, top_k=0 if name != "neuron" else 50, seed=seed,
                    max_new_tokens=16)[0].token_ids for seed in (7, 7)]
    assert runs[0] == runs[1] and len(runs[0]) > 0
    top_one = api.run(path, PROMPTS[1:2], temperature=1.0, top_k=1, seed=3, max_new_tokens=10)[0].token_ids
    greedy = api.run(path, PROMPTS[1:2], temperature=0.0, max_new_tokens=10)[0].token_ids
    assert top_one == greedy


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_every_sampling_option_is_seeded_on_a_pinned_batch(name, built):
    runner = api.open_runner(built(name, "untied", 4, 96))
    try:
        batch = [generation.encode_prompt(runner.tokenizer, prompt, chat=False) for prompt in PROMPTS]
        sampled = SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=7,
                                 repetition_penalty=1.0 if name == "neuron" else 1.2)
        first, second = runner.generate(batch, sampled), runner.generate(batch, sampled)
    finally:
        runner.close()
    assert [s.token_ids for s in first.sequences] == [s.token_ids for s in second.sequences]
    vocab = len(runner.tokenizer)
    assert all(0 <= token < vocab for s in first.sequences for token in s.token_ids)


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_api_run_streams_text(name, built):
    chunks: dict[int, str] = {}
    results = api.run(built(name, "untied", 4, 96), PROMPTS[:3], chat=True, max_new_tokens=6,
                      on_text=lambda index, text: chunks.__setitem__(index, chunks.get(index, "") + text))
    assert len(results) == 3
    for index, result in enumerate(results):
        assert result.token_ids and result.finish_reason in ("stop", "length")
        assert result.text.startswith(chunks.get(index, ""))  # a trailing partial UTF-8 character is held back


# ------------------------------------------------------------------------------ verify and corruption


@pytest.mark.parametrize("name", EVERY_TARGET)
def test_verify_runs_it_and_a_corrupt_copy_is_refused(name, built, tmp_path, capsys):
    path = built(name, "tiny", 1, 64)
    assert main(["--quiet", "verify", str(path), "--run"]) == 0, capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    flip_byte(largest_file(copy))
    capsys.readouterr()
    assert main(["--quiet", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and largest_file(copy).name in err.splitlines()[0] and "Traceback" not in err
    with pytest.raises(ArtifactError):
        api.open_runner(copy)


# ------------------------------------------------------------------------------ the real model


CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about compilers.", "List three colors.",
                "Explain recursion in one sentence."]


@pytest.mark.slow
@pytest.mark.parametrize("name", EVERY_TARGET)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_smollm2_greedy_matches_pytorch(name, batch_size, build_artifact, smollm2):
    target = BY_NAME[name]
    reason = target.missing()
    if reason:
        pytest.skip(f"{name}: {reason}")
    path = build_artifact(smollm2, **target.fields, **{"shapes.batch_size": batch_size, "shapes.sequence_length": 256})
    manifest = artifact.load(path)
    if target.validates:
        assert manifest.validation["passed"] and manifest.validation["top1_agreement"] >= 0.99
    prompts = CHAT_PROMPTS[:batch_size]
    results = api.run(path, prompts, temperature=0.0, max_new_tokens=32)
    expected = pytorch_results(smollm2, manifest, prompts, SamplingConfig(max_new_tokens=32))
    for got, want in zip(results, expected):
        assert got.token_ids == want.token_ids, got.prompt
        assert got.text == want.text
