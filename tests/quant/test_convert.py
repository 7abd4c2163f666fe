"""quantize_model on real transformers architectures, checked against bitsandbytes' bytes and
the models' own float forward."""

from __future__ import annotations

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant.nn import Linear4bit


def _tiny(arch: str):
    import transformers as tf

    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        cfg = tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True, **common)
        return tf.Qwen2ForCausalLM(cfg)
    cfg = tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4)  # Conv1D, not nn.Linear
    return tf.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantize_model_replaces_linears_and_keeps_head(bnb, arch):
    model = _tiny(arch).eval()
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    report = quant.quantize_model(model, quant.QuantConfig(bnb_4bit_use_double_quant=True))
    assert "lm_head" in report.skipped and "lm_head" not in report.quantized
    assert sorted(report.quantized) == sorted(n for n in linears if n != "lm_head")
    for name in report.quantized:
        layer = model.get_submodule(name)
        assert isinstance(layer, Linear4bit)
        packed, _ = bnb.functional.quantize_4bit(weights[name], quant_type="nf4", compress_statistics=True)
        assert torch.equal(layer.weight.data, packed), name
    assert type(model.lm_head) is torch.nn.Linear
    assert report.bytes_after < report.bytes_before
    assert "lm_head" in str(report)


def test_report_bytes_match_theory():
    model = _tiny("llama")
    n_quant = sum(m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head")
    before = sum(p.numel() * 4 for p in model.parameters())
    report = quant.quantize_model(model, quant.QuantConfig())
    assert report.bytes_before == before
    # 4 bits per weight + one float32 absmax per 64 weights, + 64-byte code table per layer.
    expected_quantized = n_quant // 2 + n_quant // 64 * 4 + 64 * len(report.quantized)
    json_bytes = report.bytes_after - (before - n_quant * 4) - expected_quantized
    assert 0 < json_bytes < 150 * len(report.quantized)  # the small JSON state blob per layer


def test_skip_modules_by_name_and_part():
    model = _tiny("llama")
    report = quant.quantize_model(model, quant.QuantConfig(llm_int8_skip_modules=["mlp", "lm_head"]))
    assert all(".mlp." not in n for n in report.quantized)
    assert any(n.endswith("mlp.down_proj") for n in report.skipped)
    assert any(n.endswith("self_attn.q_proj") for n in report.quantized)


def test_gpt2_conv1d_is_not_touched():
    model = _tiny("gpt2")
    report = quant.quantize_model(model, quant.QuantConfig())
    assert report.quantized == []  # GPT-2 uses Conv1D, only its head is an nn.Linear
    assert "lm_head" in report.skipped


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_equal_model_with_dequantized_weights(arch):
    """The quantized model computes exactly what the float model computes with the 4-bit weights
    dequantized into it: an independent forward (transformers' own nn.Linear path)."""
    model = _tiny(arch).eval()
    ref_model = _tiny(arch).eval()
    ref_model.load_state_dict(model.state_dict())
    quant.quantize_model(model, quant.QuantConfig(bnb_4bit_use_double_quant=True))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear4bit):
                ref_model.get_submodule(name).weight.copy_(quant.dequantize_4bit(module.weight, module.quant_state))
        ids = torch.randint(0, 512, (2, 12))
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, atol=1e-4, rtol=1e-4)
