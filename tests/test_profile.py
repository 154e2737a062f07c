"""``llmopt bench --profile``: where the time goes, from onnxruntime's and OpenVINO's own profilers."""

from __future__ import annotations

import json

import pytest

from llmopt import api, generation, profiling
from llmopt.cli.main import main
from tests.conftest import PROMPTS

TARGETS = {
    "onnx": ({"target": "onnx"}, "onnxruntime_genai", "GroupQueryAttention"),
    "openvino": ({"target": "openvino"}, "openvino_genai", "FullyConnected"),
    "onnx-static": ({"target": "onnx", "shapes.static": True}, "onnxruntime", "MatMul"),
    "openvino-static": ({"target": "openvino", "shapes.static": True}, "openvino", "FullyConnected"),
}


@pytest.mark.parametrize("name, role", [
    ("/model/layers.0/attn/qkv_proj/MatMul", "attention"),
    ("/model/layers.3/attn/GroupQueryAttention", "attention"),
    ("__module.model.layers.1.self_attn.o_proj/aten::linear/MatMul", "attention"),
    ("/model/layers.0/mlp/down_proj/MatMulNBits", "mlp"),
    ("__module.model.layers.2.mlp.gate_proj/aten::linear/MatMul", "mlp"),
    ("/lm_head/MatMul", "lm_head"),
    ("/model/embed_tokens/Gather", "embedding"),
    ("/model/layers.0/input_layernorm/SimplifiedLayerNormalization", "norm"),
    ("Result_1234", "other"),
])
def test_roles_from_node_names(name, role):
    assert profiling.role_of(name) == role


@pytest.mark.parametrize("name", [pytest.param(name, marks=getattr(pytest.mark, fields["target"]))
                                  for name, (fields, _, _) in TARGETS.items()])
def test_profile_accounts_for_the_operators_of_a_real_run(name, build_artifact, untied_llama):
    fields, module, expected_type = TARGETS[name]
    pytest.importorskip(module)
    path = build_artifact(untied_llama, **fields, **{"shapes.batch_size": 4, "shapes.sequence_length": 96})
    runner = api.open_runner(path)
    try:
        batch = [generation.encode_prompt(runner.tokenizer, prompt, chat=False) for prompt in PROMPTS]
        summary = runner.profile(batch, 9)
    finally:
        runner.close()
    assert summary["decode_steps"] == 8
    for phase in ("prefill", "decode"):
        part = summary[phase]
        assert part["operator_ms"] > 0 and part["wall_ms"] > 0
        assert {"attention", "mlp", "lm_head"} <= set(part["by_role"]), part["by_role"]
        assert abs(sum(part["by_role"].values()) - part["operator_ms"]) < 0.01 * part["operator_ms"] + 0.01
        assert abs(sum(part["by_op_type"].values()) - part["operator_ms"]) < 0.01 * part["operator_ms"] + 0.01
        assert part["host_ms"] == pytest.approx(max(part["wall_ms"] - part["operator_ms"], 0.0), abs=0.002)
    assert any(expected_type in op_type for op_type in summary["decode"]["by_op_type"]), summary["decode"]["by_op_type"]


def test_bench_profile_prints_the_table_and_keeps_it_in_the_json(build_artifact, untied_llama, capsys):
    pytest.importorskip("onnxruntime_genai")
    path = build_artifact(untied_llama, **{"target": "onnx", "shapes.batch_size": 1, "shapes.sequence_length": 96})
    args = ["bench", str(path), "-r", "1", "--warmup", "0", "--new-tokens", "8", "--input-lengths", "16", "--profile"]
    assert main(["--quiet", *args]) == 0
    out = capsys.readouterr().out
    assert "where the time goes" in out and "attention" in out and "MatMul" in out
    assert main(["--quiet", *args, "--json", "--baseline", "pytorch"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    artifact_row = next(row for row in rows if row.get("kind") == "artifact")
    assert artifact_row["profile"]["decode"]["by_role"]["mlp"] > 0
    eager_row = next(row for row in rows if row.get("kind") == "pytorch")
    assert "no profiler" in eager_row["profile"]["error"]
