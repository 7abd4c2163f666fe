"""torch.compile(fullgraph=True) over a transformers model whose Linears are Linear4bit."""

from __future__ import annotations

import pytest
import torch

import quantserve.quant as quant


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_compiled_llama_fullgraph_same_logits(compress_statistics):
    import transformers as tf

    torch._dynamo.reset()
    cfg = tf.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    quant.quantize_model(model, quant.QuantConfig(bnb_4bit_use_double_quant=compress_statistics))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
        out = compiled(ids).logits
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_compiled_matmul_4bit_counts_no_graph_breaks():
    torch._dynamo.reset()
    layer = quant.Linear4bit.from_linear(torch.nn.Linear(128, 64), quant.QuantConfig(bnb_4bit_use_double_quant=True))
    x = torch.randn(3, 128)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
