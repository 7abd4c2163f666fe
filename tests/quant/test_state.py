"""QuantState serialization and Linear4bit state dicts, checked against bitsandbytes both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant.state import QuantState


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_packed_dict_identical_to_bnb(bnb, quant_type, compress_statistics):
    W = torch.randn(64, 128, dtype=torch.bfloat16)
    _, ref_state = bnb.functional.quantize_4bit(W, quant_type=quant_type, compress_statistics=compress_statistics)
    ours = QuantState.from_dict(ref_state.as_dict(packed=True))
    ref_dict, our_dict = ref_state.as_dict(packed=True), ours.as_dict(packed=True)
    assert list(our_dict) == list(ref_dict)
    for key in ref_dict:
        assert torch.equal(our_dict[key], ref_dict[key]), key  # incl. the JSON bytes


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_unpacked_round_trip(compress_statistics):
    W = torch.randn(33, 65)
    packed, state = quant.quantize_4bit(W, blocksize=32, compress_statistics=compress_statistics)
    again = QuantState.from_dict(state.as_dict(packed=False))
    assert torch.equal(quant.dequantize_4bit(packed, again), quant.dequantize_4bit(packed, state))
    assert again.shape == state.shape and again.blocksize == 32 and again.dtype == state.dtype


def test_state_is_frozen():
    _, state = quant.quantize_4bit(torch.randn(4, 64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.blocksize = 128


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("absmax"), "missing"),
        (lambda d: d.update(bogus=torch.zeros(1)), "unexpected"),
        (lambda d: d.update({"quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)}), "JSON"),
        (lambda d: d.update({"quant_state.bitsandbytes__int4": d.pop("quant_state.bitsandbytes__nf4")}), "int4"),
    ],
)
def test_from_dict_errors(mutate, message):
    _, state = quant.quantize_4bit(torch.randn(4, 64))
    d = state.as_dict(packed=True)
    mutate(d)
    with pytest.raises(ValueError, match=message):
        QuantState.from_dict(d)


def _bnb_linear_from_state_dict(bnb, sd, in_features, out_features):
    """How transformers loads a prequantized checkpoint into bitsandbytes: Params4bit.from_prequantized."""
    layer = bnb.nn.Linear4bit(in_features, out_features, bias="bias" in sd, device="meta")
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    if "bias" in sd:
        layer.bias = torch.nn.Parameter(sd["bias"])
    return layer


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_our_state_dict_loads_into_bnb(bnb, tmp_path, quant_type, compress_statistics, dtype):
    from safetensors.torch import load_file, save_file

    linear = torch.nn.Linear(256, 96).to(dtype)
    config = quant.QuantConfig(bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=compress_statistics)
    ours = quant.Linear4bit.from_linear(linear, config)
    save_file(ours.state_dict(), tmp_path / "layer.safetensors")
    sd = load_file(tmp_path / "layer.safetensors")
    theirs = _bnb_linear_from_state_dict(bnb, sd, 256, 96)
    W_theirs = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    W_ours = quant.dequantize_4bit(ours.weight, ours.quant_state)
    assert torch.equal(W_ours, W_theirs)
    x = torch.randn(4, 256, dtype=dtype)
    theirs.compute_dtype = dtype
    ref = torch.nn.functional.linear(x, W_theirs, linear.bias.detach())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(ours(x), ref, atol=tol, rtol=tol)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ref, atol=4 * tol, rtol=4 * tol)


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_state_dict_loads_into_ours(bnb, tmp_path, quant_type, compress_statistics):
    from safetensors.torch import load_file, save_file

    linear = torch.nn.Linear(256, 64, dtype=torch.bfloat16)
    theirs = bnb.nn.Linear4bit(
        256, 64, compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=compress_statistics
    )
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes here
    save_file(theirs.state_dict(), tmp_path / "layer.safetensors")
    ours = quant.Linear4bit(256, 64, quant_type=quant_type)
    ours.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert ours.quant_state.quant_type == quant_type
    W_theirs = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(quant.dequantize_4bit(ours.weight, ours.quant_state), W_theirs)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(
        ours(x).float(), torch.nn.functional.linear(x.float(), W_theirs.float(), linear.bias.float()), atol=5e-2, rtol=5e-2
    )
    # Saving again gives bitsandbytes' bytes back unchanged.
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_load_state_dict_reports_bad_shape():
    src = quant.Linear4bit.from_linear(torch.nn.Linear(64, 32))
    dst = quant.Linear4bit(64, 16)
    with pytest.raises(RuntimeError, match="does not match"):
        dst.load_state_dict(src.state_dict())
