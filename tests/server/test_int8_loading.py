"""--quant int8 through the loader, the prequantized-checkpoint path, `quantserve quantize` and
`quantserve inspect`, on tiny random models, against transformers + bitsandbytes 8-bit (the oracle:
same int8 bytes; its input embedding and output head brought to 16 bits as quantserve loads them:
server/engine/models/sixteen_bit.py). Logits: with --int8-activations bit for bit those of
bitsandbytes in eval mode (LLM.int8 proper); by default those of bitsandbytes' dequantized-weight
path (its CPU MatMul8bitFp, taken in training mode) to float32 rounding."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant import Linear8bitLt
from quantserve.server.loading.loader import LoadConfig, load_model

from .loader_helpers import logits, tiny_model

THRESHOLD = 3.0  # low enough for the random models' activations to have outlier columns
INT8 = quant.QuantConfig(load_in_8bit=True, llm_int8_threshold=THRESHOLD)
INT8_ACTS = quant.QuantConfig(load_in_8bit=True, llm_int8_threshold=THRESHOLD, llm_int8_activations=True)


def bnb_int8_reference(folder, threshold=THRESHOLD):
    """transformers + bitsandbytes quantizing (or loading, if prequantized) `folder` to 8 bits."""
    import transformers as tf

    config = tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32).eval()


def as_quantserve_loads(model):
    """The model with its input embedding and output head at 16 bits, as quantserve's loader
    places them; the int8 layers are untouched."""
    from quantserve.server.engine.models.sixteen_bit import to_16bit

    to_16bit(model, torch.float32)
    return model


def bnb_int8_modules(model) -> dict:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}


def bnb_exact(model):
    """The model with bitsandbytes' Linear8bitLt layers on their dequantized-weight path
    (MatMul8bitFp, which bitsandbytes takes on CPU in training mode; a Linear has no dropout)."""
    for layer in bnb_int8_modules(model).values():
        layer.train()
    return model


def assert_same_logits(got, want, int8_activations):
    """Bit for bit against bitsandbytes' eval forward with int8 activations; else float32 rounding
    against its dequantized-weight path (int8 activations would be ~1e-2 away)."""
    if int8_activations:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):
        model = tiny_model(arch)
        with torch.no_grad():  # hidden states big enough to cross the threshold
            model.get_input_embeddings().weight.mul_(40.0)
        out[arch] = tmp_path_factory.mktemp(arch)
        model.save_pretrained(out[arch])
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def _load(folder, **kwargs):
    kwargs.setdefault("quant", INT8)
    return load_model(LoadConfig(str(folder), device="cpu", progress=False, **kwargs))


def _assert_same_int8_layers(ours, theirs):
    ref = bnb_int8_modules(theirs)
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, Linear8bitLt)}
    assert mine and sorted(mine) == sorted(ref)
    for name, layer in mine.items():
        assert torch.equal(layer.weight.data, ref[name].weight.data), name
        assert torch.equal(layer.weight.SCB, ref[name].weight.SCB), name


@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_logits_match_transformers_bitsandbytes(folders, ids, arch, int8_activations):
    result = _load(folders[arch], quant=INT8_ACTS if int8_activations else INT8)
    theirs = as_quantserve_loads(bnb_int8_reference(folders[arch]))
    _assert_same_int8_layers(result.model, theirs)
    if not int8_activations:
        bnb_exact(theirs)
    got, want = logits(result.model, ids), logits(theirs, ids)
    assert_same_logits(got, want, int8_activations)
    report = result.report
    assert report.quant.load_in_8bit and len(report.quantized) == len(bnb_int8_modules(theirs))
    assert "int8" in report.summary()
    if arch == "gpt2":
        assert report.transposed  # Conv1D weights stored transposed, as transformers + bitsandbytes


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prequantized_8bit_checkpoint_loads_as_stored(folders, ids, tmp_path, arch):
    theirs = bnb_int8_reference(folders[arch])
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "model.safetensors")
    result = _load(tmp_path, quant=quant.QuantConfig())  # the default request: as stored
    assert result.report.prequantized and result.report.checkpoint_format == "bitsandbytes 8-bit (prequantized)"
    assert result.report.quant.load_in_8bit and result.report.quant.llm_int8_threshold == THRESHOLD
    for name, layer in result.model.named_modules():
        if isinstance(layer, Linear8bitLt):
            key = name if name + ".SCB" in stored else name.removeprefix("transformer.")
            assert torch.equal(layer.weight.data, stored[key + ".weight"]), name
            assert torch.equal(layer.weight.SCB, stored[key + ".SCB"]), name
    assert_same_logits(logits(result.model, ids), logits(bnb_exact(as_quantserve_loads(theirs)), ids), False)
    acts = _load(tmp_path, quant=dataclasses.replace(quant.QuantConfig(), llm_int8_activations=True))
    assert acts.report.prequantized and all(m.int8_activations for m in acts.model.modules() if isinstance(m, Linear8bitLt))
    assert torch.equal(logits(acts.model, ids), logits(theirs.eval(), ids))
    with pytest.raises(ValueError, match=r"already quantized \(int8\)"):
        _load(tmp_path, quant=quant.QuantConfig(bnb_4bit_quant_type="fp4"))
    assert _load(tmp_path, quant=quant.QuantConfig(load_in_8bit=True)).report.prequantized  # --quant int8: as stored


def test_cli_quantize_int8_checkpoint_loads_in_transformers_with_same_logits(folders, ids, tmp_path, capsys):
    import transformers as tf

    from quantserve.server.cli import main

    out = tmp_path / "int8"
    assert main(["quantize", str(folders["llama"]), str(out), "--quant", "int8", "--no-progress"]) == 0
    assert "layers int8" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["load_in_8bit"] and not config["load_in_4bit"] and config["llm_int8_threshold"] == 6.0
    theirs = tf.AutoModelForCausalLM.from_pretrained(out).eval()  # transformers + bitsandbytes, as stored
    assert bnb_int8_modules(theirs)
    as_quantserve_loads(theirs)
    ours = _load(folders["llama"], quant=quant.QuantConfig(load_in_8bit=True, llm_int8_activations=True))
    _assert_same_int8_layers(ours.model, theirs)
    assert torch.equal(logits(theirs, ids), logits(ours.model, ids))
    # and quantserve loads it back as stored (the default request, with the same activation choice)
    again = _load(out, quant=dataclasses.replace(quant.QuantConfig(), llm_int8_activations=True))
    assert again.report.prequantized and torch.equal(logits(again.model, ids), logits(ours.model, ids))


def test_cli_inspect_int8(folders, capsys):
    from quantserve.server.cli import main

    assert main(["inspect", str(folders["llama"]), "--quant", "int8", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "int8 (LLM.int8), outlier threshold 6" in text and "Linear8bitLt" in text
    line = next(t for t in text.splitlines() if t.startswith("quantized"))
    # LLM.int8's layout, from the transformers model's own Linear shapes: 8 bits a weight and one
    # float32 scale per output row (SCB)
    linears = [m for name, m in tiny_model("llama").named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    weights = sum(m.weight.numel() for m in linears)
    expected = (8 * weights + 32 * sum(m.out_features for m in linears)) / weights
    bits = float(line.split(" bits/param")[0].rsplit(" ", 1)[1])
    theory = float(line.split("(theory ")[1].split(" ")[0])
    assert bits == pytest.approx(expected, abs=5e-4) and theory == pytest.approx(expected, abs=5e-4)  # 3 decimals


def test_int8_settings_and_errors(folders, capsys):
    from quantserve.server.cli import main
    from quantserve.server.config import Settings

    assert Settings(quant="int8").quant == "int8"
    assert main(["inspect", str(folders["llama"]), "--quant", "int8", "--double-quant", "--no-progress"]) == 1
    assert "--double-quant applies to the 4-bit formats" in capsys.readouterr().err
