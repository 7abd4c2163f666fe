"""The LLM.int8 ops: torch.library.opcheck (schema, fakes, dispatch, autograd), fake shapes, and
torch.compile(fullgraph=True) over Linear8bitLt and a transformers model built from it."""

from __future__ import annotations

import pytest
import torch

import quantserve.quant as quant

from .test_int8_parity import with_outliers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_int8_ops(dtype):
    A = with_outliers((6, 40), dtype)
    for threshold in (0.0, 6.0):
        torch.library.opcheck(torch.ops.quant.int8_vectorwise_quant.default, (A, threshold))
    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(24, 40))
    torch.library.opcheck(torch.ops.quant.int8_vectorwise_dequant.default, (CB, SCB))
    bias = torch.randn(24, dtype=dtype)
    for threshold in (0.0, 6.0):
        for b in (None, bias):
            torch.library.opcheck(torch.ops.quant.gemm_int8.default, (A, CB, SCB, threshold, b))
    # The autograd registration: gradients for A and the bias.
    x = A.float().requires_grad_()
    torch.library.opcheck(torch.ops.quant.gemm_int8.default, (x, CB, SCB, 6.0, bias.float().requires_grad_()))
    # int8_linear, the default forward (weight-only), with and without bias, and its autograd.
    for b in (None, bias):
        torch.library.opcheck(torch.ops.quant.int8_linear.default, (A, CB, SCB, b))
    torch.library.opcheck(torch.ops.quant.int8_linear.default, (x, CB, SCB, bias.float().requires_grad_()))


def test_fake_shapes_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    A = torch.randn(2, 5, 33)
    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(7, 33))
    real = torch.ops.quant.int8_vectorwise_quant(A, 6.0)
    real_out = torch.ops.quant.gemm_int8(A, CB, SCB, 6.0, None)
    real_linear = torch.ops.quant.int8_linear(A, CB, SCB, None)
    with FakeTensorMode() as mode:
        fake = torch.ops.quant.int8_vectorwise_quant(mode.from_tensor(A), 6.0)
        fake_out = torch.ops.quant.gemm_int8(mode.from_tensor(A), mode.from_tensor(CB), mode.from_tensor(SCB), 6.0, None)
        fake_linear = torch.ops.quant.int8_linear(mode.from_tensor(A), mode.from_tensor(CB), mode.from_tensor(SCB))
    assert fake_linear.shape == real_linear.shape == (2, 5, 7) and fake_linear.dtype == real_linear.dtype
    assert [t.shape for t in fake] == [t.shape for t in real]
    assert [t.dtype for t in fake] == [t.dtype for t in real]
    assert fake_out.shape == real_out.shape == (2, 5, 7) and fake_out.dtype == real_out.dtype


def test_compiled_linear8bitlt_no_graph_breaks():
    torch._dynamo.reset()
    layer = quant.Linear8bitLt.from_linear(torch.nn.Linear(128, 64))
    x = with_outliers((3, 128), torch.float32)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_compiled_llama_8bit_fullgraph_same_logits():
    import transformers as tf

    torch._dynamo.reset()
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(80.0)  # some activations above the threshold
    quant.quantize_model(model, quant.QuantConfig(load_in_8bit=True))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        eager = model(ids).logits
        out = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
