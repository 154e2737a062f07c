"""``llmopt bench`` on the tiny model: the PyTorch baseline, a PyTorch-target artifact (no exporter
needed) and, where the exporter exists, a tiny ONNX artifact. No timing thresholds: only that the
metrics exist, are positive and agree with their definitions, and that every output format holds
the same rows."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from llmopt.benchmark import BenchConfig, parse_baselines, prompts, report, stats, suite
from llmopt.cli.main import main
from llmopt.errors import UsageError

from tests._hardening import exported_onnx, pytorch_artifact
from tests.conftest import build_untied_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fake_artifact(tiny_llama, tmp_path_factory) -> Path:
    """A real artifact the PyTorch runner loads (target pytorch), pinned to batch 1 and 128 tokens."""
    return pytorch_artifact(tiny_llama, tmp_path_factory.mktemp("bench") / "tiny-pt", sequence_length=128)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def draft(tiny_llama, tmp_path_factory) -> Path:
    """Another random Llama with the same tokenizer: a draft for assisted-generation rows."""
    return build_untied_llama(tiny_llama, tmp_path_factory.mktemp("draft"), seed=2)


@pytest.fixture(scope="module")
def result(tiny_llama, fake_artifact, draft):
    """One real run: the artifact and the eager baseline, each in its own worker process."""
    config = BenchConfig(artifacts=[str(fake_artifact)], baselines=["eager"], baseline_model=str(tiny_llama),
                         input_ratios=[0.25, 0.5], new_tokens=6, batch_sizes=[1, 2], repetitions=2, warmup=1,
                         threads=1, prompt_lookup=2, drafts=[str(draft)], draft_tokens=3)
    return suite.run(config)


def ok_rows(result):
    return [row for row in result.rows if row["status"] == "ok"]


# -- prompts ------------------------------------------------------------------------------------


def test_synthetic_prompts_exact_seeded_and_free_of_special_ids(tokenizer):
    vocab = prompts.normal_vocab(tokenizer, {tokenizer.eos_token_id})
    special = set(tokenizer.all_special_ids)
    batch = prompts.synthetic_batch(vocab, 37, 4, seed=3)
    assert [len(row) for row in batch] == [37] * 4
    assert not special & {token for row in batch for token in row}
    assert batch == prompts.synthetic_batch(vocab, 37, 4, seed=3)
    assert batch != prompts.synthetic_batch(vocab, 37, 4, seed=4)
    assert prompts.synthetic_batch(vocab, 37, 1, seed=3) == batch[:1]  # the batch-1 prompt is row 0
    assert len({tuple(row) for row in batch}) == 4


def test_grounded_prompt_fits_and_uses_the_chat_template(tokenizer):
    ids = prompts.grounded_prompt(tokenizer, 120)
    assert 0 < len(ids) <= 120
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    full = prompts.grounded_prompt(tokenizer, 100_000)
    assert len(full) > len(ids) and "Hillside reservoir" in tokenizer.decode(full)
    with pytest.raises(UsageError):
        prompts.grounded_prompt(tokenizer, 5)


# -- definitions --------------------------------------------------------------------------------


def test_summarize_follows_the_definitions():
    samples = {"ttft_s": [0.1, 0.2, 0.3], "decode_s": [0.9, 1.0, 1.1], "e2e_s": [1.0, 1.2, 1.4],
               "new_tokens": [22, 22, 22]}
    metrics, notes = stats.summarize(samples, batch_size=2, input_length=5)
    assert metrics["total_tokens"] == 2 * 5 + 22
    assert metrics["throughput_tok_s"] == pytest.approx(32 / 1.2, rel=1e-3)
    assert metrics["tpot_ms"] == pytest.approx(1000.0 / 10, rel=1e-3)  # 1.0 s over 11 - 1 steps
    assert metrics["decode_tok_s"] == pytest.approx(2 * 10 / 1.0, rel=1e-3)
    assert metrics["ttft_ms"] == pytest.approx(200.0) and metrics["ttft_ms_p90"] >= metrics["ttft_ms"]
    assert metrics["high_variance"] and "TTFT" in notes[0]  # 0.28 / 0.2


def test_parse_baselines():
    assert parse_baselines(["pytorch"]) == ["eager"]  # the plain baseline users ask for; the others behind :all
    assert parse_baselines(["pytorch:all"]) == ["eager", "static", "compile"]
    assert parse_baselines(["pytorch:eager,static"]) == ["eager", "static"]
    assert parse_baselines(["pytorch:static", "pytorch:eager", "pytorch:static"]) == ["static", "eager"]
    assert parse_baselines(["none"]) == []
    with pytest.raises(UsageError):
        parse_baselines(["tensorflow"])


# -- planning (no worker runs) --------------------------------------------------------------------


def test_same_prompts_for_every_subject_and_batch_rule(tiny_llama, fake_artifact, tmp_path, monkeypatch):
    second = pytorch_artifact(tiny_llama, tmp_path / "second", sequence_length=128)
    plans = []

    def fake_worker(plan, workdir, on_event):
        plans.append(plan)
        return {"error": "not run"}

    monkeypatch.setattr(suite, "run_worker", fake_worker)
    config = BenchConfig(artifacts=[str(fake_artifact), str(second)], baselines=["eager", "static"],
                         baseline_model=str(tiny_llama), input_ratios=[0.25, 0.75], batch_sizes=[1, 4], seed=7)
    result = suite.run(config)
    assert [plan["subject"]["name"] for plan in plans] == [str(fake_artifact), str(second), "pytorch:eager", "pytorch:static"]
    by_case: dict[tuple, list] = {}
    for plan in plans:
        for case in plan["cases"]:
            assert [len(row) for row in case["prompt_ids"]] == [case["input_length"]] * case["batch_size"]
            assert case["input_length"] + case["new_tokens"] == 128  # generate up to the sequence length
            by_case.setdefault((case["batch_size"], case["input_length"]), []).append(case["prompt_ids"])
    assert set(by_case) == {(1, 32), (1, 96), (4, 32), (4, 96)}
    for key, copies in by_case.items():
        assert all(copy == copies[0] for copy in copies), key
    assert len(by_case[(1, 32)]) == 4 and len(by_case[(4, 32)]) == 2  # artifacts run only their pinned batch
    skipped = [row for row in result.rows if row["status"] == "skipped"]
    assert {(row["subject"], row["batch_size"]) for row in skipped} == {(str(fake_artifact), 4), (str(second), 4)}
    assert "pinned to batch size 1" in skipped[0]["note"]
    assert result.failed


def test_nothing_to_run_is_a_usage_error(fake_artifact):
    with pytest.raises(UsageError):
        suite.run(BenchConfig(artifacts=[str(fake_artifact)], batch_sizes=[3]))
    with pytest.raises(UsageError):
        suite.run(BenchConfig(baselines=["eager"]))  # a baseline needs a checkpoint


# -- a real run ---------------------------------------------------------------------------------


def test_rows_cover_the_plan(result, fake_artifact):
    keys = {(row["subject"], row["batch_size"], row["input_length"], row["decoding"], row["status"]) for row in result.rows}
    for length in (32, 64):
        assert (str(fake_artifact), 1, length, "greedy", "ok") in keys
        assert ("pytorch:eager", 1, length, "greedy", "ok") in keys
        assert ("pytorch:eager", 2, length, "greedy", "ok") in keys
    assert any(key[:2] == (str(fake_artifact), 2) and key[4] == "skipped" for key in keys)
    assert not result.failed
    assert result.machine["cpu"] and result.machine["versions"]["torch"]


def test_metrics_present_positive_and_consistent(result):
    for row in ok_rows(result):
        for name in ("ttft_ms", "tpot_ms", "e2e_ms", "decode_tok_s", "throughput_tok_s", "peak_rss_mib", "load_s", "size_mib"):
            assert row[name] is not None and row[name] > 0, (name, row)
        assert row["ttft_ms"] < row["e2e_ms"]
        assert row["ttft_ms"] <= row["ttft_ms_p90"] <= row["ttft_ms_p99"]
        assert row["reps"] == 2 and row["samples"]["new_tokens"] == [row["batch_size"] * row["new_tokens"]] * 2
        total = row["batch_size"] * (row["input_length"] + row["new_tokens"])
        assert row["total_tokens"] == total
        assert row["throughput_tok_s"] == pytest.approx(total / (row["e2e_ms"] / 1000.0), rel=1e-3)
        assert row["runtimes"] == "torch"


def test_ratios_against_the_eager_baseline(result, fake_artifact):
    rows = {(row["subject"], row["batch_size"], row["input_length"], row["decoding"]): row for row in ok_rows(result)}
    artifact_row = rows[(str(fake_artifact), 1, 32, "greedy")]
    eager = rows[("pytorch:eager", 1, 32, "greedy")]
    assert artifact_row["vs"] == "pytorch:eager"
    assert artifact_row["decode_speedup"] == pytest.approx(artifact_row["decode_tok_s"] / eager["decode_tok_s"], rel=1e-2)
    assert artifact_row["ttft_speedup"] == pytest.approx(eager["ttft_ms"] / artifact_row["ttft_ms"], rel=1e-2)
    assert eager["vs"] is None


def test_speculative_rows(result, draft):
    grounded = [row for row in ok_rows(result) if row["prompt"] == "grounded"]
    assert {(row["subject"], row["decoding"]) for row in grounded if row["subject"] == "pytorch:eager"} == {
        ("pytorch:eager", "greedy"), ("pytorch:eager", "prompt-lookup:2"), ("pytorch:eager", f"draft:{draft.name}:3")}
    for decoding in ("prompt-lookup:2", f"draft:{draft.name}:3"):
        row = next(row for row in grounded if row["decoding"] == decoding and row["subject"] == "pytorch:eager")
        assert row["vs"] == "pytorch:eager" and row["decode_speedup"] > 0  # against its own greedy row
        assert row["samples"]["new_tokens"] == [row["new_tokens"]] * 2  # cut to exactly the requested count
    assert len({row["input_length"] for row in grounded}) == 1


def test_a_draft_goes_to_the_subjects_that_can_use_it(tiny_llama, fake_artifact, draft, tmp_path):
    """A checkpoint drafts for the PyTorch baseline; an artifact only for artifacts of its own target."""
    config = BenchConfig(artifacts=[str(fake_artifact)], baselines=["eager"], baseline_model=str(tiny_llama),
                         drafts=[str(draft), str(fake_artifact)])
    subjects, _, _ = suite.plan_subjects(config)
    drafts = {subject.name: sorted(case.decoding for case in subject.cases if case.decoding.startswith("draft"))
              for subject in subjects}
    assert drafts["pytorch:eager"] == [f"draft:{draft.name}:5"]
    assert drafts[str(fake_artifact)] == []  # itself is no draft, and a checkpoint drafts only for PyTorch
    with pytest.raises(UsageError, match="--draft"):
        suite.plan_subjects(BenchConfig(artifacts=[str(fake_artifact)], drafts=[str(tmp_path / "missing")]))


def test_formats_hold_the_same_rows(result, tmp_path):
    expected = [report.flat(row) for row in result.rows]
    as_json = [json.loads(line) for line in report.render(result.rows, result.machine, "json").splitlines()]
    assert [{key: row[key] for key in report.COLUMNS} for row in as_json] == expected
    assert all(row["machine"]["cpu"] for row in as_json)

    def cells(row):
        return ["" if value is None else str(value) for value in row.values()]

    as_csv = list(csv.DictReader(io.StringIO(report.render(result.rows, result.machine, "csv"))))
    assert [list(row.values()) for row in as_csv] == [cells(row) for row in expected]

    lines = [line for line in report.render(result.rows, result.machine, "md").splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(report.COLUMNS) and set(lines[1]) <= {"|", "-"}
    body = [[cell.strip() for cell in line[1:-1].split(" | ")] for line in lines[2:]]
    assert body == [[cell.replace("|", "\\|") for cell in cells(row)] for row in expected]

    png = report.plot(result.rows, tmp_path / "plots" / "bench.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_table_prints(result, capsys):
    report.print_table(result.rows, result.machine, result.notes)
    out = capsys.readouterr().out
    assert "pytorch:eager" in out and "TTFT" in out and "[sum]" in out and "RSS MiB" in out


def test_cli_json_and_plot(fake_artifact, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    code = main(["bench", str(fake_artifact), "--input-lengths", "8", "--new-tokens", "4", "-r", "1", "--warmup", "0",
                 "--threads", "1", "--json", "--plot", str(plot)])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["subject"], row["input_length"], row["new_tokens"], row["status"]) for row in rows] == [
        (str(fake_artifact), 8, 4, "ok")]
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_cli_output_dir_writes_every_format(fake_artifact, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["bench", str(fake_artifact), "--input-lengths", "8,12", "--new-tokens", "4", "-r", "1", "--warmup", "0",
                 "--threads", "1", "--output-dir", str(out)])
    assert code == 0
    assert "tiny-pt" in capsys.readouterr().out  # the table, with the artifact's short name
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [(row["input_length"], row["status"]) for row in rows] == [(8, "ok"), (12, "ok")]
    assert len(list(csv.DictReader((out / "bench.csv").open()))) == 2
    assert (out / "bench.md").read_text().count(str(fake_artifact)) == 2
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_usage_errors(fake_artifact, capsys):
    assert main(["bench"]) == 2
    assert main(["bench", str(fake_artifact), "--input-ratios", "0.5,1.5"]) == 2
    assert main(["bench", str(fake_artifact), "--format", "xml"]) == 2
    assert main(["bench", str(fake_artifact), "--baseline", "jax"]) == 2


@pytest.fixture(scope="module")
def onnx_artifact(tiny_llama, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime_genai", reason="pip install 'llmopt[onnx]'")
    return exported_onnx(tiny_llama, tmp_path_factory, sequence_length=128)


@pytest.fixture(scope="module")
def openvino_artifact(tiny_llama, tmp_path_factory) -> Path:
    pytest.importorskip("openvino_genai", reason="pip install 'llmopt[openvino]'")
    from llmopt import api
    from llmopt.recipe import Recipe

    recipe = Recipe.model_validate({"model": {"id": str(tiny_llama)}, "target": "openvino",
                                    "shapes": {"sequence_length": 128}})
    output = tmp_path_factory.mktemp("bench-openvino") / "tiny-ov"
    api.export(recipe, output)
    return output


def _check_against_baseline(path: Path, target: str):
    outcome = suite.run(BenchConfig(artifacts=[str(path)], baselines=["eager"], input_ratios=[0.25],
                                    new_tokens=5, repetitions=2, warmup=1))
    rows = {row["subject"]: row for row in ok_rows(outcome)}
    assert set(rows) == {str(path), "pytorch:eager"}  # the manifest's source checkpoint is the baseline
    row = rows[str(path)]
    assert row["target"] == target and row["input_length"] == 32 and row["new_tokens"] == 5
    assert row["samples"]["new_tokens"] == [5, 5]
    assert 0 < row["ttft_ms"] < row["e2e_ms"] and row["peak_rss_mib"] > 0
    assert row["vs"] == "pytorch:eager" and row["decode_speedup"] > 0 and row["ttft_speedup"] > 0
    return row


def _check_native_overhead(path: Path, target: str):
    overhead = _load_script("native_overhead")
    result = overhead.measure(path, repetitions=1, new_tokens=6)
    assert result["target"] == target and result["same_tokens"], result
    assert set(result["median_ms"]) == {"generate", "runner", "native"}
    assert all(value > 0 for value in result["ratio_to_native"].values())  # no threshold here: timing is noisy


@pytest.mark.onnx
def test_onnx_artifact_against_the_baseline(onnx_artifact):
    row = _check_against_baseline(onnx_artifact, "onnx")
    assert "torch" not in row["runtimes"].split(",")  # no second runtime in the ONNX worker


@pytest.mark.onnx
def test_onnx_native_overhead_script(onnx_artifact):
    _check_native_overhead(onnx_artifact, "onnx")


@pytest.mark.openvino
def test_openvino_artifact_against_the_baseline(openvino_artifact):
    _check_against_baseline(openvino_artifact, "openvino")


@pytest.mark.openvino
def test_openvino_native_overhead_script(openvino_artifact):
    _check_native_overhead(openvino_artifact, "openvino")


# -- bench/ scripts -------------------------------------------------------------------------------

FAKE_LLAMA_CPP = '''
class Llama:
    """Stands in for llama_cpp.Llama: greedy "decoding" that counts up from the last prompt token."""
    resets = 0

    def __init__(self, model_path, n_ctx, **options):
        self.n_ctx = n_ctx

    def token_eos(self):
        return 2

    def reset(self):
        Llama.resets += 1

    def generate(self, tokens, **options):
        token = tokens[-1]
        while True:
            token = 3 + (token + 1) % 300
            yield token
'''


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llamacpp_peer_rows_in_the_bench_schema(tiny_llama, tmp_path, monkeypatch, capsys):
    """The peer script's plumbing, with a stand-in llama_cpp module (llama-cpp-python is not in CI)."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.syspath_prepend(str(stub))
    monkeypatch.setenv("PYTHONPATH", str(stub))  # the worker process imports it too
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    peer = _load_script("llamacpp_peer")
    out = tmp_path / "peer.jsonl"
    code = peer.main(["--gguf", str(gguf), "--baseline-model", str(tiny_llama), "--sequence-length", "64",
                      "--input-lengths", "8,16", "--new-tokens", "5", "-r", "2", "--warmup", "1", "--json", "--output", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["subject"], row["input_length"], row["new_tokens"], row["status"]) for row in rows] == [
        ("llama.cpp:q4_1", 8, 5, "ok"), ("llama.cpp:q4_1", 16, 5, "ok")]
    for row in rows:
        assert row["kind"] == "peer" and row["target"] == "llama.cpp" and row["size_mib"] is not None
        assert row["samples"]["new_tokens"] == [5, 5] and 0 < row["ttft_ms"] < row["e2e_ms"]


def test_membw_measures_and_bounds(fake_artifact, tmp_path, capsys):
    membw = _load_script("membw")
    result = membw.bandwidth(size_mib=16, repeat=1, threads=2)
    assert result["copy_gb_s"] > 0 and result["sum_gb_s"] > 0
    assert membw.weight_bytes(fake_artifact) == (fake_artifact / "model.safetensors").stat().st_size
    bench_rows = tmp_path / "rows.jsonl"
    bench_rows.write_text(json.dumps({"subject": str(fake_artifact), "status": "ok", "batch_size": 1,
                                      "decoding": "greedy", "decode_tok_s": 123.0}) + "\n")
    assert membw.main([str(fake_artifact), "--size-mib", "16", "--repeat", "1", "--bench", str(bench_rows), "--json"]) == 0
    (bound,) = json.loads(capsys.readouterr().out)["bounds"]
    assert bound["measured_tok_s"] == 123.0 and bound["bound_tok_s"] > 0 and bound["of_bound"] > 0


def test_a_plain_bench_is_one_llama_bench_case_and_the_sweep_is_a_flag():
    """llama-bench's shape by default: one 128-token prompt and 128 new tokens; --sweep gives 25/50/75 %."""
    from llmopt.benchmark import plan

    assert plan._input_pairs(BenchConfig(), 512) == ([(128, 128)], [])
    assert plan._input_pairs(BenchConfig(), 64) == ([(32, 32)], [])  # capped to fit a short artifact
    assert plan._input_pairs(BenchConfig(new_tokens=16), 512) == ([(128, 16)], [])
    swept, _ = plan._input_pairs(BenchConfig(input_ratios=list(plan.SWEEP_RATIOS)), 512)
    assert swept == [(128, 384), (256, 256), (384, 128)]
