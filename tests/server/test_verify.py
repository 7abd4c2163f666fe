"""`quantserve verify` against transformers + bitsandbytes (BitsAndBytesConfig on the same
folder) reading the same text: perplexity of both models, KL divergence and top-1 agreement
computed here with torch.nn.functional on their logits. A small random model with the default
model's tokenizer (fast), and the default model itself (slow)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from quantserve.server.loading.default_text import TEXT
from quantserve.server.loading.verify import VerifyRequest, format_verify, quant_config, verify

from .loader_helpers import bnb_reference


@pytest.fixture(scope="module")
def small_folder(default_model_dir, tmp_path_factory):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("verify") / "small"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _reference(folder, fmt: str, int8_activations: bool = False) -> dict:
    """The same figures from transformers (16-bit side) and transformers + bitsandbytes (int8:
    its dequantized-weight path, quantserve's default, or with int8_activations its eval forward)."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    base = bnb_reference(folder, None)
    if fmt == "int8":
        from quantserve.server.engine.models.sixteen_bit import to_16bit

        quantized = tf.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=tf.BitsAndBytesConfig(load_in_8bit=True)).eval()
        to_16bit(quantized, torch.float32)
        if not int8_activations:
            import bitsandbytes as bnb

            for layer in quantized.modules():
                if isinstance(layer, bnb.nn.Linear8bitLt):
                    layer.train()  # bitsandbytes' CPU MatMul8bitFp: the dequantized-weight matmul
    else:
        quantized = bnb_reference(folder, quant_config(fmt))
    with torch.no_grad():
        p = F.log_softmax(base(ids).logits[0, :-1].float(), -1)
        q = F.log_softmax(quantized(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return {
        "perplexity_16bit": torch.exp(F.nll_loss(p, targets)).item(),
        "perplexity_quantized": torch.exp(F.nll_loss(q, targets)).item(),
        "kl_divergence": F.kl_div(q, p, log_target=True, reduction="batchmean").item(),
        "top1_agreement": (p.argmax(-1) == q.argmax(-1)).float().mean().item(),
        "tokens": ids.shape[1],
    }


def _check(ours: dict, fmt: str, ref: dict, int8_activations: bool = False) -> None:
    got = ours["formats"][fmt]["int8_activations"] if int8_activations else ours["formats"][fmt]
    assert ours["text"]["tokens"] == ref["tokens"]
    assert ours["perplexity_16bit"] == pytest.approx(ref["perplexity_16bit"], rel=1e-4)
    assert got["perplexity_quantized"] == pytest.approx(ref["perplexity_quantized"], rel=1e-4)
    assert got["kl_divergence"] == pytest.approx(ref["kl_divergence"], rel=1e-3, abs=1e-6)
    assert got["top1_agreement"] == pytest.approx(ref["top1_agreement"], abs=2 / ref["tokens"])  # near-ties


# nf4 and int8 by default (a minute on 2 cores); the double-quantized and fp4 variants in the slow set
@pytest.mark.parametrize("fmt", ["nf4", pytest.param("nf4+dq", marks=pytest.mark.slow),
                                 pytest.param("fp4", marks=pytest.mark.slow), "int8"])
def test_verify_matches_transformers_bitsandbytes(small_folder, fmt):
    torch.set_float32_matmul_precision("highest")
    ours = verify(VerifyRequest(model=str(small_folder), formats=(fmt,), progress=False))
    _check(ours, fmt, _reference(small_folder, fmt))
    assert ours["formats"][fmt]["tokens_per_second"] > 0
    if fmt == "int8":  # the opt-in's figures beside the default's
        _check(ours, fmt, _reference(small_folder, fmt, int8_activations=True), int8_activations=True)
        assert ours["formats"][fmt]["int8_activations"]["tokens_per_second"] > 0
        assert "int8+acts" in format_verify(ours)


def test_cli_verify_json_and_text_file(small_folder, tmp_path, capsys):
    from quantserve.server.cli import main

    text = tmp_path / "text.txt"
    text.write_text(TEXT[:2000])
    assert main(["verify", str(small_folder), "--quant", "nf4", "int8", "--double-quant", "--text", str(text),
                 "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["formats"]) == {"nf4+dq", "int8"} and out["text"]["source"] == str(text)
    for figures in out["formats"].values():
        assert {"perplexity_quantized", "kl_divergence", "top1_agreement", "perplexity_ratio"} <= set(figures)
        assert figures["kl_divergence"] >= 0 and 0 <= figures["top1_agreement"] <= 1
    assert main(["verify", str(small_folder), "--text", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read --text" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_default_model_matches_transformers_bitsandbytes(default_model_dir):
    torch.set_float32_matmul_precision("highest")
    ours = verify(VerifyRequest(model=str(default_model_dir), formats=("nf4",), progress=False))
    _check(ours, "nf4", _reference(default_model_dir, "nf4"))
