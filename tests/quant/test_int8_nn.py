"""Int8Params / Linear8bitLt: lazy quantization, state dicts both ways with bitsandbytes, module
moves and casts, copies, gradients, QuantConfig and quantize_model against transformers + bitsandbytes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import quantserve.quant as quant
from quantserve.quant import Int8Params, Linear8bitLt

from .test_int8_parity import assert_dequant_matmul, bnb_linear, with_outliers

INT8_ACTS = quant.QuantConfig(load_in_8bit=True, llm_int8_activations=True)


def _bnb_state_dict(bnb, N=48, K=96, threshold=6.0, dtype=torch.float32):
    weight, bias = torch.randn(N, K).to(dtype), torch.randn(N).to(dtype)
    layer = bnb_linear(bnb, weight, bias, threshold)
    return layer, layer.state_dict()


def test_int8params_quantizes_on_first_transfer(bnb):
    W = torch.randn(40, 72, dtype=torch.bfloat16)
    p = Int8Params(W.clone())
    assert not p.int8_quantized and p.CB is None and p.dtype == torch.bfloat16
    assert not p.to(torch.float16).int8_quantized and not p.to("meta").int8_quantized
    q = p.to("cpu")
    ref = bnb.nn.Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert q.int8_quantized and q.dtype == torch.int8 and torch.equal(q.data, ref.data) and torch.equal(q.SCB, ref.SCB)
    assert q.CB is not None and torch.equal(q.CB, q.data)
    again = q.to("cpu")  # later moves keep the bytes
    assert torch.equal(again.data, q.data) and torch.equal(again.SCB, q.SCB)
    assert p.to(torch.float16).to("cpu").int8_quantized


def test_bnb_saved_state_dict_loads_directly(bnb):
    theirs, sd = _bnb_state_dict(bnb)
    assert set(sd) == {"weight", "bias", "SCB", "weight_format"}
    # bitsandbytes itself refuses this before a device move on CPU.
    with pytest.raises(RuntimeError, match="non-quantized"):
        bnb.nn.Linear8bitLt(96, 48, has_fp16_weights=False, threshold=6.0).load_state_dict(sd)
    ours = Linear8bitLt(96, 48, int8_activations=True)
    ours.load_state_dict(sd)  # strict: no missing or unexpected keys
    assert ours.weight.int8_quantized and torch.equal(ours.weight.data, sd["weight"]) and torch.equal(ours.SCB, sd["SCB"])
    x = with_outliers((4, 96), torch.float32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        ours.int8_activations = False  # the default: the dequantized-weight matmul
        assert_dequant_matmul(ours(x), x, sd["weight"], sd["SCB"], sd["bias"])
    # Built on the meta device (as loaders do), it loads the same.
    with torch.device("meta"):
        empty = Linear8bitLt(96, 48, int8_activations=True)
    empty.load_state_dict(sd)
    assert empty.weight.device.type == "cpu" and empty.bias.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(empty(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_our_state_dict_loads_in_bitsandbytes(bnb, dtype):
    linear = nn.Linear(96, 48).to(dtype)
    ours = Linear8bitLt.from_linear(linear, INT8_ACTS)
    assert ours.int8_activations and not Linear8bitLt.from_linear(linear).int8_activations
    sd = ours.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].dtype == torch.float32
    assert sd["weight_format"].dtype == torch.uint8 and sd["weight_format"].item() == 0
    theirs = bnb.nn.Linear8bitLt(96, 48, has_fp16_weights=False, threshold=6.0).to(dtype).to("cpu").eval()
    theirs.load_state_dict(sd)
    assert torch.equal(theirs.weight.data, ours.weight.data) and torch.equal(theirs.weight.SCB, ours.SCB)
    x = with_outliers((3, 96), dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    # Through pickle (torch.save) as well.
    buf = pickle.dumps(sd)
    again = Linear8bitLt(96, 48)
    again.load_state_dict(pickle.loads(buf))
    assert torch.equal(again.weight.data, ours.weight.data)


def test_state_dict_errors():
    _, sd = Linear8bitLt(8, 4), Linear8bitLt.from_linear(nn.Linear(8, 4)).state_dict()
    bad = dict(sd, weight_format=torch.tensor(2, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="row-major"):
        Linear8bitLt(8, 4).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="expected int8"):
        Linear8bitLt(8, 5).load_state_dict(dict(sd))
    quantized = Linear8bitLt.from_linear(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="float weight cannot be loaded"):
        quantized.load_state_dict(nn.Linear(8, 4).state_dict())
    # weight_format as bitsandbytes' older string form is accepted.
    Linear8bitLt(8, 4).load_state_dict(dict(sd, weight_format="row"))


def test_module_moves_and_casts():
    linear = nn.Linear(64, 32)
    model = nn.Sequential(Linear8bitLt(64, 32))
    model[0].load_state_dict(linear.state_dict())
    model.half()  # before quantization: a cast
    assert not model[0].weight.int8_quantized and model[0].weight.dtype == torch.float16
    model.to("cpu")  # the first move quantizes
    assert model[0].weight.int8_quantized
    CB, SCB = model[0].weight.data.clone(), model[0].SCB.clone()
    model.float()  # never re-types the int8 rows
    assert model[0].weight.dtype == torch.int8 and torch.equal(model[0].weight.data, CB)
    assert torch.equal(model[0].SCB, SCB) and model[0].bias.dtype == torch.float32
    copied = copy.deepcopy(model)
    assert torch.equal(copied[0].weight.data, CB) and copied[0].SCB is not model[0].SCB
    assert torch.equal(pickle.loads(pickle.dumps(model))[0].SCB, SCB)


def test_first_forward_quantizes_like_bitsandbytes(bnb):
    # A float weight never moved: bitsandbytes quantizes it on the first forward; so do we.
    linear = nn.Linear(64, 32)
    ours = Linear8bitLt(64, 32, int8_activations=True)
    ours.load_state_dict(linear.state_dict())
    x = with_outliers((2, 64), torch.float32)
    theirs = bnb_linear(bnb, linear.weight.detach(), linear.bias.detach(), 6.0)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert ours.weight.int8_quantized


def test_input_gradient_matches_bitsandbytes(bnb):
    weight, bias = torch.randn(24, 40), torch.randn(24)
    theirs = bnb_linear(bnb, weight, bias, 6.0)
    ours = Linear8bitLt(40, 24)
    ours.load_state_dict(theirs.state_dict())
    x = with_outliers((5, 40), torch.float32)
    g = torch.randn(5, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).backward(g)
    theirs(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad)


def test_has_fp16_weights_keeps_float_weight_and_trains():
    linear = nn.Linear(32, 16)
    config = quant.QuantConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True)
    layer = Linear8bitLt.from_linear(linear, config)
    assert layer.weight.dtype == torch.float32 and not layer.weight.int8_quantized
    frozen = Linear8bitLt.from_linear(linear)
    x = with_outliers((3, 32), torch.float32)
    with torch.no_grad():
        assert torch.equal(layer(x), frozen(x))  # the same int8 forward
    layer.weight.requires_grad_(True)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 16).T @ x)  # straight through


def test_config_round_trips_transformers_8bit():
    from transformers import BitsAndBytesConfig

    theirs = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.5, llm_int8_skip_modules=["lm_head", "mlp"],
                                llm_int8_has_fp16_weight=True)
    ours = quant.QuantConfig.from_dict(theirs.to_dict())
    assert ours.load_in_8bit and not ours.load_in_4bit and ours.llm_int8_threshold == 4.5
    assert ours.llm_int8_skip_modules == ("lm_head", "mlp") and ours.llm_int8_has_fp16_weight
    assert quant.QuantConfig.from_dict(ours.to_dict()) == ours
    assert BitsAndBytesConfig.from_dict(ours.to_dict()).load_in_8bit
    assert quant.QuantConfig(load_in_8bit=True).load_in_4bit is False and quant.QuantConfig().load_in_4bit is True
    with pytest.raises(ValueError, match="exactly one"):
        quant.QuantConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="llm_int8_threshold"):
        quant.QuantConfig(load_in_8bit=True, llm_int8_threshold=-1.0)


def test_validation_errors():
    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(4, 8))
    with pytest.raises(ValueError, match="threshold"):
        quant.int8_matmul(torch.randn(2, 8), CB, SCB, threshold=float("nan"))
    with pytest.raises(ValueError, match="input features"):
        quant.int8_matmul(torch.randn(2, 9), CB, SCB)
    with pytest.raises(TypeError, match="CB must be"):
        quant.int8_matmul(torch.randn(2, 8), CB.float(), SCB)
    with pytest.raises(TypeError, match="SCB must be"):
        quant.int8_matmul(torch.randn(2, 8), CB, SCB.half())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quant.int8_vectorwise_quant(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="bias"):
        quant.int8_matmul(torch.randn(2, 8), CB, SCB, bias=torch.zeros(5))


def _tiny_llama(tmp_path):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():  # activations big enough to cross the threshold somewhere
        model.model.embed_tokens.weight.mul_(80.0)
    model.save_pretrained(tmp_path)
    return model


def test_quantize_model_8bit_equals_transformers_bitsandbytes(bnb, tmp_path):
    import transformers as tf

    model = _tiny_llama(tmp_path).eval()
    exact = copy.deepcopy(model)
    report = quant.quantize_model(model, INT8_ACTS)
    assert "lm_head" in report.skipped and len(report.quantized) == 14
    assert all(isinstance(model.get_submodule(n), Linear8bitLt) for n in report.quantized)
    theirs = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=tf.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    ).eval()
    for name in report.quantized:
        assert torch.equal(model.get_submodule(name).weight.data, theirs.get_submodule(name).weight.data), name
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, theirs(ids).logits)
    assert report.bytes_after < report.bytes_before / 2
    # The default (unquantized activations) against bitsandbytes' dequantized-weight path: float32
    # rounding through two layers, never the int8 activations' ~1e-2.
    quant.quantize_model(exact, quant.QuantConfig(load_in_8bit=True))
    for name in report.quantized:
        theirs.get_submodule(name).train()  # bitsandbytes' CPU MatMul8bitFp
    with torch.no_grad():
        torch.testing.assert_close(exact(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
