"""The decoder forward's building blocks against the modules they replace: every family's RMSNorms
as one fused op (models/norms.py) bit for bit, and fused 4-bit projections (models/fused_linear.py)
against each part's own Linear4bit forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantserve.quant as quant
from quantserve.server.engine.models.fused_linear import FusedLinear
from quantserve.server.engine.models.norms import RMSNorm, norm_fn

from . import family_models as fm


@pytest.mark.parametrize("family", sorted(fm.FAMILIES))
def test_every_rms_norm_fuses_bit_for_bit(family):
    """Each of the model's norm modules that norm_fn turns into the fused op computes exactly what
    the module computes on float32 input (magnitudes from 1e-3 to 1e3); the others stay modules."""
    model = fm.family_model(family)
    g = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert norms
    fused = 0
    for module in norms:
        fn = norm_fn(module)
        width = module.weight.shape[0] if getattr(module, "weight", None) is not None else None
        if not isinstance(fn, RMSNorm):
            assert fn is module
            continue
        fused += 1
        x = torch.randn(5, 3, width, generator=g) * torch.logspace(-3, 3, 5).view(5, 1, 1)
        with torch.inference_mode():
            assert torch.equal(fn(x), module(x)), f"{family}: {type(module).__name__}"
    if "RMSNorm" in {type(m).__name__.removeprefix(type(m).__name__.split("RMSNorm")[0]) for m in norms}:
        assert fused, f"{family}: no RMSNorm was fused"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fused_4bit_projection_equals_its_parts(quant_type, double_quant):
    """q/k/v as one matmul over concatenated 4-bit weights: each part's columns equal that part's own
    Linear4bit forward (quant.matmul_4bit), within float32 rounding of the reduction; the parts' own
    weights become views of the fused bytes (one copy)."""
    torch.manual_seed(0)
    parts = []
    for out in (64, 32, 32):
        config = quant.QuantConfig(bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                   bnb_4bit_compute_dtype=torch.float32)
        parts.append(quant.Linear4bit.from_linear(nn.Linear(128, out, bias=out == 32), config))
    x = torch.randn(7, 128)
    with torch.inference_mode():
        want = torch.cat([p(x) for p in parts], dim=-1)
        fused = FusedLinear(parts)
        got = fused(x)
        again = torch.cat([p(x) for p in parts], dim=-1)  # the parts, now views, still compute the same
    bound = 128 * 2**-24 * want.abs().max().item()  # reduction length x float32's unit roundoff x scale
    torch.testing.assert_close(got, want, atol=bound, rtol=0)
    torch.testing.assert_close(again, want, atol=bound, rtol=0)
    base = fused.weight.untyped_storage().data_ptr()
    assert all(p.weight.data.untyped_storage().data_ptr() == base for p in parts)
