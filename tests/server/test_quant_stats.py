"""What quantizing cost, measured while loading (server/loading/quant_stats.py), against an
independent oracle: bitsandbytes quantizes and dequantizes the same original weights (read from
the checkpoint with safetensors), numpy computes the error, absmax and outliers in float64, and
bits per parameter come from the format's definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import quantserve.quant as quant
from quantserve.server.loading.loader import LoadConfig, load_model
from quantserve.server.loading.quant_stats import OUTLIER_RMS

from .loader_helpers import save_tiny

SETTINGS = {
    "nf4": (quant.QuantConfig(), 4 + 32 / 64),
    "nf4+dq": (quant.QuantConfig(bnb_4bit_use_double_quant=True), 4 + 8 / 64 + 32 / (64 * 256)),
    "fp4": (quant.QuantConfig(bnb_4bit_quant_type="fp4"), 4 + 32 / 64),
    "fp4+dq": (quant.QuantConfig(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True), 4 + 8 / 64 + 32 / (64 * 256)),
    "int8": (quant.QuantConfig(load_in_8bit=True), None),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("stats") / "llama")


def _bnb_dequantized(bnb, w: torch.Tensor, q: quant.QuantConfig) -> np.ndarray:
    F = bnb.functional
    if q.load_in_8bit:  # Int8Params: row-wise absmax of the float16 weight
        CB, SCB, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return CB.numpy().astype(np.float64) * SCB.numpy().astype(np.float64)[:, None] / 127
    packed, state = F.quantize_4bit(w, blocksize=q.blocksize, quant_type=q.bnb_4bit_quant_type,
                                    compress_statistics=q.bnb_4bit_use_double_quant)
    return F.dequantize_4bit(packed, state).numpy().astype(np.float64)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_layer_stats_match_bitsandbytes_and_numpy(bnb, folder, setting):
    q, bits = SETTINGS[setting]
    result = load_model(LoadConfig(str(folder), quant=q, progress=False))
    stats = result.report.layer_stats
    assert [s.name for s in stats] == result.report.quantized  # every quantized layer, in model order
    originals = load_file(str(folder / "model.safetensors"))
    for s in stats:
        w = originals[s.name + ".weight"].float()
        ref = w.numpy().astype(np.float64)
        deq = _bnb_dequantized(bnb, w, q)
        expected = np.linalg.norm(ref - deq) / np.linalg.norm(ref)
        assert s.rel_error == pytest.approx(expected, rel=1e-4), s.name
        assert s.absmax == pytest.approx(np.abs(ref).max(), rel=1e-6)
        rms = np.sqrt(np.mean(ref**2))
        assert s.outlier_fraction == pytest.approx(np.mean(np.abs(ref) > OUTLIER_RMS * rms), abs=1e-9)
        assert s.shape == tuple(w.shape) and s.has_original
        n, blocks = w.numel(), -(-w.numel() // 64)
        if q.load_in_8bit:  # int8 rows + a float32 scale per row
            theory = 8 + 32 / w.shape[1]
        elif q.bnb_4bit_use_double_quant:  # 4-bit codes, an 8-bit absmax code per block, a float32 per 256 blocks
            theory = (n * 4 + blocks * 8 + 32 * -(-blocks // 256)) / n
        else:
            theory = bits
        assert s.bits_per_param == pytest.approx(theory, rel=1e-9)
    summary = result.report.quantization_summary()
    assert summary["layers"] == len(stats) and summary["has_original"]
    assert summary["format"] == ("int8" if q.load_in_8bit else q.bnb_4bit_quant_type)
    assert summary["rel_error_max"] == max(s.rel_error for s in stats)
    # the error of all layers together, from numpy over the concatenated weights
    allw = np.concatenate([originals[s.name + ".weight"].double().numpy().ravel() for s in stats])
    alld = np.concatenate([_bnb_dequantized(bnb, originals[s.name + ".weight"].float(), q).ravel() for s in stats])
    assert summary["rel_error_overall"] == pytest.approx(np.linalg.norm(allw - alld) / np.linalg.norm(allw), rel=1e-4)


def test_outliers_are_counted_where_they_are(folder, tmp_path):
    """A weight with planted outliers: the count is exact (the cheap path reads only the blocks
    whose absmax can hold one)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        flat = w.view(-1)
        picks = torch.randperm(flat.numel())[:37]
        flat[picks] = torch.where(torch.rand(37) > 0.5, 1.0, -1.0) * w.abs().max() * 40
    model.save_pretrained(tmp_path / "m")
    ref = w.detach().double().numpy()
    expected = np.mean(np.abs(ref) > OUTLIER_RMS * np.sqrt(np.mean(ref**2)))
    for q in (quant.QuantConfig(bnb_4bit_use_double_quant=True), quant.QuantConfig(load_in_8bit=True)):
        stats = load_model(LoadConfig(str(tmp_path / "m"), quant=q, progress=False)).report.layer_stats
        down = next(s for s in stats if s.name == "model.layers.0.mlp.down_proj")
        assert down.outlier_fraction == pytest.approx(expected, abs=1e-12) and expected * ref.size >= 37
        assert down.absmax == pytest.approx(np.abs(ref).max(), rel=1e-6)


def test_prequantized_checkpoint_reports_no_error(folder, tmp_path, capsys):
    from quantserve.server.cli import main

    assert main(["quantize", str(folder), str(tmp_path / "q"), "--no-progress"]) == 0
    report = load_model(LoadConfig(str(tmp_path / "q"), progress=False)).report
    assert report.prequantized and len(report.layer_stats) == len(report.quantized) > 0
    assert all(s.rel_error is None and not s.has_original for s in report.layer_stats)
    summary = report.quantization_summary()
    assert summary["rel_error_mean"] is None and summary["has_original"] is False and "prequantized" in summary["note"]
    assert summary["bits_per_param"] == pytest.approx(4.5)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "relative error unknown: prequantized checkpoint" in out
    assert "null" in out.split("quantized layer")[1]


def test_inspect_prints_the_cost_per_layer(folder, capsys):
    from quantserve.server.cli import main

    assert main(["inspect", str(folder), "--quant", "fp4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    result = load_model(LoadConfig(str(folder), quant=quant.QuantConfig(bnb_4bit_quant_type="fp4"), progress=False))
    for s in result.report.layer_stats:
        assert any(line.startswith(s.name) and f"{s.rel_error:.5f}" in line and "fp4" in line for line in out.splitlines())
    assert "relative error (Frobenius) mean" in out and "bits/param achieved" in out


def test_stats_can_be_switched_off(folder):
    report = load_model(LoadConfig(str(folder), progress=False, quant_stats=False)).report
    assert report.layer_stats == [] and report.stats_seconds == 0
    assert report.quantization_summary()["layers"] == 0


@pytest.mark.parametrize("setting", ["nf4", "nf4+dq", "int8"])
def test_large_layers_are_measured_on_an_even_sample(bnb, setting):
    """A layer above SAMPLE_ELEMENTS is measured on every k-th block (row): within 2% of the exact
    error from bitsandbytes + numpy, and it says how much it read."""
    from quantserve.server.loading.quant_stats import SAMPLE_ELEMENTS, layer_stats

    q, _ = SETTINGS[setting]
    torch.manual_seed(1)
    w = torch.randn(1536, 1024) * torch.linspace(0.2, 3, 1024)  # columns of different scales
    w[7, 5] = 40.0  # an outlier, counted exactly wherever it is
    if q.load_in_8bit:
        param = quant.Int8Params(w, requires_grad=False).quantize()
    else:
        param = quant.Params4bit(w, requires_grad=False, quant_type=q.bnb_4bit_quant_type,
                                 compress_statistics=q.bnb_4bit_use_double_quant).quantize()
    s = layer_stats("big", param, w)
    ref = w.double().numpy()
    exact = np.linalg.norm(ref - _bnb_dequantized(bnb, w, q)) / np.linalg.norm(ref)
    assert s.sampled_fraction < 0.5 and s.sampled_fraction * w.numel() >= SAMPLE_ELEMENTS
    assert s.rel_error == pytest.approx(exact, rel=0.02)
    assert s.frobenius_norm == pytest.approx(np.linalg.norm(ref), rel=0.02)
    assert s.absmax == 40.0 and s.outlier_fraction * w.numel() >= 1
