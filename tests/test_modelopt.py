"""ModelOpt post-training quantization on the CPU: FP8, W4A16-AWQ and W8A8-SmoothQuant checkpoints.

``llmopt.modelopt_ckpt.quantize_checkpoint`` runs ``modelopt.torch.quantization.quantize`` and
``modelopt.torch.export.export_hf_checkpoint`` on the tiny random Llama; these tests check what a
TensorRT-LLM build reads from the result (hf_quant_config.json, the config's quantization_config,
the quantized weights and their scales, their dtypes) and that the fake-quantized model stays close
to the fp32 one. The pure helpers (configs, group sizes, calibration text) need no ModelOpt.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from llmopt import modelopt_ckpt
from llmopt.errors import RecipeError, UsageError

HAVE_MODELOPT = modelopt_ckpt.__name__ and __import__("importlib").util.find_spec("modelopt") is not None
requires_modelopt = pytest.mark.skipif(not HAVE_MODELOPT, reason="needs nvidia-modelopt[torch] (pip install 'nvidia-modelopt[torch]')")

# algo -> (kv cache, hf_quant_config quant_algo, kv_cache_quant_algo, weight dtype name)
CASES = {
    "fp8": ("fp8", "FP8", "FP8", "float8_e4m3fn"),
    "w4a16_awq": (None, "W4A16_AWQ", None, "uint8"),
    "w8a8_sq": (None, "W8A8_SQ_PER_CHANNEL", None, "int8"),
}
# Fake-quantized vs fp32, teacher-forced on llmopt's validation text (the tiny model's logits are
# sharp: its lm_head is scaled x8 by the fixture, so argmax ties are rare).
MIN_TOP1 = {"fp8": 0.9, "w4a16_awq": 0.8, "w8a8_sq": 0.9}
MAX_KL = {"fp8": 0.05, "w4a16_awq": 0.2, "w8a8_sq": 0.05}


@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory):
    """Each algorithm once per session: AWQ's search takes a while on the CPU."""
    pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt[torch]")
    root = tmp_path_factory.mktemp("modelopt")
    results = {}
    for algo, (kv_cache, *_rest) in CASES.items():
        report = modelopt_ckpt.quantize_checkpoint(tiny_llama, root / algo, algo, kv_cache=kv_cache,
                                                   dtype="fp16", device="cpu", max_samples=4, max_length=64)
        results[algo] = report
    return results


def tensors(directory: Path) -> dict:
    from safetensors import safe_open

    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                found[key] = handle.get_tensor(key)
    return found


@requires_modelopt
@pytest.mark.parametrize("algo", sorted(CASES))
def test_quant_configs_written(quantized, algo):
    _, quant_algo, kv_algo, _ = CASES[algo]
    report = quantized[algo]
    assert (report.quant_algo, report.kv_cache_quant_algo) == (quant_algo, kv_algo)
    out = Path(report.out_dir)
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["producer"]["name"] == "modelopt"
    assert hf_quant["quantization"]["quant_algo"] == quant_algo
    assert hf_quant["quantization"]["kv_cache_quant_algo"] == kv_algo
    assert "lm_head" in hf_quant["quantization"]["exclude_modules"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["quantization_config"]["quant_algo"] == quant_algo
    assert (out / "tokenizer.json").is_file()  # TensorRT-LLM's LLM loads the tokenizer from the checkpoint


@requires_modelopt
@pytest.mark.parametrize("algo", sorted(CASES))
def test_quantized_weights_scales_and_dtypes(quantized, algo):
    import torch

    _, _, kv_algo, weight_dtype = CASES[algo]
    found = tensors(Path(quantized[algo].out_dir))
    layer = "model.layers.0"
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        weight = found[f"{layer}.{proj}.weight"]
        assert str(weight.dtype) == f"torch.{weight_dtype}", proj
        assert f"{layer}.{proj}.weight_scale" in found, proj
    # Unquantized parts at the export dtype.
    assert found["model.embed_tokens.weight"].dtype == torch.float16
    assert found[f"{layer}.input_layernorm.weight"].dtype == torch.float16
    q = f"{layer}.self_attn.q_proj"
    if algo == "fp8":
        assert found[f"{q}.input_scale"].numel() == 1 and found[f"{q}.weight_scale"].numel() == 1  # per tensor
        assert f"{layer}.self_attn.k_proj.k_scale" in found and f"{layer}.self_attn.v_proj.v_scale" in found
    elif algo == "w8a8_sq":
        assert found[f"{q}.weight_scale"].shape == (64,)  # per output channel
        assert found[f"{q}.pre_quant_scale"].shape == (64,)  # the SmoothQuant smoothing factors
        assert found[f"{q}.input_scale"].numel() == 1
    else:  # int4 AWQ: two weights per byte, one scale per group of 64 inputs (the tiny model is 64 wide)
        assert quantized[algo].block_size == 64
        assert found[f"{q}.weight"].shape == (32, 64)
        assert found[f"{q}.weight_scale"].shape[0] == 64
        assert found[f"{layer}.mlp.down_proj.weight"].shape == (32, 128)
        # AWQ folds the q/k/v smoothing into the shared input layernorm; o_proj keeps its own.
        assert found[f"{layer}.self_attn.o_proj.pre_quant_scale"].shape == (64,)
    if kv_algo is None:
        assert not any(key.endswith(("k_scale", "v_scale")) for key in found)


@requires_modelopt
@pytest.mark.parametrize("algo", sorted(CASES))
def test_fake_quantized_model_stays_close_to_fp32(quantized, algo):
    metrics = quantized[algo].fake_quant
    assert metrics["tokens"] >= 32
    assert metrics["top1_agreement"] >= MIN_TOP1[algo], metrics
    assert metrics["mean_kl"] <= MAX_KL[algo], metrics
    assert metrics["perplexity"] < 1.5 * metrics["reference_perplexity"], metrics
    assert metrics["perplexity"] != metrics["reference_perplexity"], "the quantizers did nothing"


@requires_modelopt
def test_fp8_checkpoint_loads_back_into_transformers(quantized):
    """The FP8 checkpoint is a normal HF directory: transformers can read its config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    out = quantized["fp8"].out_dir
    assert AutoConfig.from_pretrained(out).model_type == "llama"
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


# ------------------------------------------------------------------------------ pure helpers


def test_block_size_choice():
    assert modelopt_ckpt.pick_block_size({4096, 11008}) == 128
    assert modelopt_ckpt.pick_block_size({576, 1536}) == 64  # SmolLM2-135M
    assert modelopt_ckpt.pick_block_size({576, 1536}, 64) == 64
    with pytest.raises(RecipeError, match="does not divide the matmul input width 576"):
        modelopt_ckpt.pick_block_size({576, 1536}, 128)
    with pytest.raises(RecipeError, match="accepted: 128, 64"):
        modelopt_ckpt.pick_block_size({4096}, 32)
    with pytest.raises(RecipeError, match="none of 128, 64"):
        modelopt_ckpt.pick_block_size({100})


def test_options_are_checked_before_any_work():
    with pytest.raises(RecipeError, match="FP8 KV cache"):
        modelopt_ckpt.check_options("w8a8_sq", "int8")
    with pytest.raises(UsageError, match="unknown quantization algorithm"):
        modelopt_ckpt.check_options("nf4", None)
    with pytest.raises(UsageError, match="nothing to quantize"):
        modelopt_ckpt.check_options("none", None)


def _fake_mtq(layout: str):
    """ModelOpt's config constants in the dict layout (<=0.3x) or the list layout (newer)."""
    if layout == "dict":
        weight = {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 128}}, "*lm_head*": {"enable": False}}
        kv = {"*[kv]_bmm_quantizer": {"num_bits": (4, 3), "axis": None, "enable": True}, "default": {"enable": False}}
        fp8 = {"*weight_quantizer": {"num_bits": (4, 3)}, "*input_quantizer": {"num_bits": (4, 3)}}
    else:
        weight = [{"quantizer_name": "*", "enable": False},
                  {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "block_sizes": {-1: 128}}}]
        kv = [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}}]
        fp8 = [{"quantizer_name": "*", "enable": False},
               {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": (4, 3)}}]
    return types.SimpleNamespace(
        INT4_AWQ_CFG={"quant_cfg": weight, "algorithm": {"method": "awq_lite"}},
        FP8_KV_CFG={"quant_cfg": kv, "algorithm": "max"},
        FP8_DEFAULT_CFG={"quant_cfg": fp8, "algorithm": "max"},
        INT8_SMOOTHQUANT_CFG={"quant_cfg": fp8, "algorithm": "smoothquant"},
    )


@pytest.mark.parametrize("layout", ["dict", "list"])
def test_modelopt_config_in_both_layouts(layout):
    mtq = _fake_mtq(layout)
    config = modelopt_ckpt.modelopt_config("w4a16_awq", "fp8", block_size=64, mtq=mtq)
    entries = dict(modelopt_ckpt._entries(config["quant_cfg"]))
    assert entries["*weight_quantizer"]["block_sizes"][-1] == 64
    assert "*[kv]_bmm_quantizer" in entries
    assert "default" not in (config["quant_cfg"] if layout == "dict" else {})
    assert mtq.INT4_AWQ_CFG["quant_cfg"] is not config["quant_cfg"]  # a copy: the constant is untouched
    assert dict(modelopt_ckpt._entries(mtq.INT4_AWQ_CFG["quant_cfg"]))["*weight_quantizer"]["block_sizes"][-1] == 128
    kv_only = modelopt_ckpt.modelopt_config("none", "fp8", mtq=mtq)
    assert [name for name, _ in modelopt_ckpt._entries(kv_only["quant_cfg"]) if name != "*"] == ["*[kv]_bmm_quantizer"]


def test_calibration_texts(tmp_path):
    shipped = modelopt_ckpt.calibration_texts(None, 10)
    assert len(shipped) == 10 and all(shipped)
    (tmp_path / "calib.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert modelopt_ckpt.calibration_texts(str(tmp_path / "calib.txt"), 3) == ["first paragraph", "second paragraph", "first paragraph"]
    (tmp_path / "calib.jsonl").write_text('{"text": "a"}\n"b"\n')
    assert modelopt_ckpt.calibration_texts(str(tmp_path / "calib.jsonl"), 2) == ["a", "b"]
    with pytest.raises(RecipeError, match="quantization.dataset"):
        modelopt_ckpt.calibration_texts("no-such-set", 2)
