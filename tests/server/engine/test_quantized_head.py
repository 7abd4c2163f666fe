"""--quantize-lm-head (server/engine/models/quantized_head.py) on small random Llamas, tied and untied:
the nf4 head's bytes are bitsandbytes', the int8 head's rows are bitsandbytes' int8 rows, a tied
embedding looks up the dequantized rows (and no 16-bit copy is left), transformers' forward gives
float64 math's logits on the dequantized head, and bad values are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantserve.quant as quant
from quantserve.quant.convert import model_nbytes
from quantserve.server.engine.models.quantized_head import (Int8Head, NF4Head, QuantizedEmbedding, head_memory,
                                                             quantize_lm_head)
from quantserve.server.engine.models.sixteen_bit import to_16bit

V, K = 1000, 128


def tiny_llama(tied: bool, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=K, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # embedding rows of a realistic spread (the init's are ~0.02)
        model.get_input_embeddings().weight.normal_(0, 1)
        if not tied:
            model.get_output_embeddings().weight.normal_(0, 0.5)
    to_16bit(model)  # as the loader leaves it: embedding and head at 16 bits
    return model


def dequantized(head) -> torch.Tensor:
    """The head's weight dequantized independently of the module: quant.dequantize_4bit for nf4
    (the library's own decoder), int8 rows times absmax / 127."""
    if isinstance(head, NF4Head):
        state = quant.QuantState(absmax=head.absmax, shape=torch.Size((V, K)), dtype=torch.float32,
                                 blocksize=64, quant_type="nf4", code=quant.get_4bit_code("nf4"))
        return quant.dequantize_4bit(head.weight.reshape(-1, 1), state).double()
    return head.weight.double() * head.scale.double()[:, None]


def test_nf4_head_bytes_equal_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(V, K).to(torch.bfloat16)
    head = NF4Head.from_weight(weight, None)
    packed, state = F.quantize_4bit(weight.float(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(head.weight.reshape(-1), packed.reshape(-1).view(torch.uint8))
    assert torch.equal(head.absmax, state.absmax)
    assert head.weight.shape == (V, K // 2) and head.weight.numel() + 4 * head.absmax.numel() == V * K // 2 + V * K // 16


def test_int8_head_rows_equal_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(V, K)
    weight[3] = 0  # a zero row stays zero (no division by a zero absmax)
    head = Int8Head.from_weight(weight, None)
    CB, SCB, _ = F.int8_vectorwise_quant(weight)
    assert torch.equal(head.weight, CB) and torch.allclose(head.scale * 127, SCB)
    assert not head.weight[3].any() and head.scale[3] == 0


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_tied_embedding_reads_the_dequantized_rows(kind):
    model = tiny_llama(tied=True)
    before = model_nbytes(model)
    info = quantize_lm_head(model, kind)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, QuantizedEmbedding) and embed.head is head and info["tied"]
    ids = torch.tensor([[0, 7, 999, 7, 512]])
    rows = embed(ids)
    assert rows.dtype == torch.float32 and rows.shape == (1, 5, K)
    # Each element is one float32 product (code or int8 value times its scale), as the float64
    # product rounded once to float32.
    assert torch.equal(rows, dequantized(head).float()[ids])
    # No 16-bit (or float) copy of the vocabulary matrix is left anywhere in the model.
    assert not any(t.is_floating_point() and t.shape == (V, K) for t in model.state_dict().values())
    head_bytes = V * K + 4 * V if kind == "int8" else V * K // 2 + 4 * (V * K // 64) + 4 * 16
    assert info["bytes"] == head_bytes == head_memory(model)["bytes"]
    assert before - model_nbytes(model) == 2 * V * K - head_bytes  # one bf16 matrix replaced by the head
    assert embed.weight.shape[0] == V  # what the engine reads as the vocabulary size


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_transformers_forward_is_float64_math_on_the_dequantized_head(kind, tied):
    model = tiny_llama(tied)
    embed_before = model.get_input_embeddings()
    quantize_lm_head(model, kind)
    head = model.get_output_embeddings()
    if not tied:  # an untied model keeps its own 16-bit embedding
        assert model.get_input_embeddings() is embed_before and embed_before.weight.dtype == torch.bfloat16
    captured = {}
    model.model.register_forward_hook(lambda m, a, out: captured.update(h=out.last_hidden_state))  # returns None
    ids = torch.tensor([[1, 2, 3, 500, 999, 4]])
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.dtype == torch.float32
    want = captured["h"].double() @ dequantized(head).T
    # float32 sums of 128 products (nf4 under the default "highest" precision: float32 products too).
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-4)


def test_bad_values_are_refused():
    model = tiny_llama(tied=True)
    with pytest.raises(ValueError, match="must be one of none, int8, nf4, got 'int4'"):
        quantize_lm_head(model, "int4")
    assert quantize_lm_head(model, "none") is None and type(model.get_output_embeddings()).__name__ == "Head16"
    quantize_lm_head(model, "int8")
    with pytest.raises(ValueError, match="the output head is a Int8Head"):
        quantize_lm_head(model, "nf4")  # not twice
    from quantserve.server.loading.loader import LoadConfig

    with pytest.raises(ValueError, match="quantize_lm_head must be one of none, int8, nf4, got 'q8'"):
        LoadConfig(quantize_lm_head="q8")


def test_the_flag_and_its_environment_variable(monkeypatch, capsys):
    from pydantic import ValidationError

    from quantserve.server.cli import build_parser, main
    from quantserve.server.config import Settings
    from quantserve.server.serve import settings_from_args

    assert settings_from_args(build_parser().parse_args(["serve"])).quantize_lm_head == "none"
    args = build_parser().parse_args(["serve", "--quantize-lm-head", "nf4"])
    assert settings_from_args(args).quantize_lm_head == "nf4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantize-lm-head", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    monkeypatch.setenv("QUANTSERVE_QUANTIZE_LM_HEAD", "fp8")
    assert main(["serve"]) == 2  # refused before anything loads
    assert "--quantize-lm-head: Input should be 'none', 'int8' or 'nf4'" in capsys.readouterr().err
    with pytest.raises(ValidationError):
        Settings(quantize_lm_head="int4")


def test_load_for_serving_passes_the_head_format(monkeypatch):
    from quantserve.server.config import Settings
    from quantserve.server.loading import loader

    seen = {}
    monkeypatch.setattr(loader, "load_model", lambda config: seen.setdefault("config", config))
    loader.load_for_serving(Settings(quantize_lm_head="int8"))
    assert seen["config"].quantize_lm_head == "int8"


def test_head_is_not_a_float_linear():
    model = tiny_llama(tied=False)
    model.set_output_embeddings(nn.Identity())
    with pytest.raises(ValueError, match="the output head is a Identity"):
        quantize_lm_head(model, "int8")
