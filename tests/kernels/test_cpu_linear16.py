"""The 16-bit output head's CPU kernel (kernels/cpu/linear16.cpp) against float64 math on the bf16
weights, within the float32 rounding bound of its sums (tests/rounding.py): odd sizes, 1..64 rows,
with and without bias, exact float32 products and (on AVX-512-BF16 CPUs) bf16 products, and batch
invariance (a row's logits do not depend on the rows beside it)."""

from __future__ import annotations

import pytest
import torch

from quantserve.kernels.cpu import linear16

from ..native import require_native
from ..rounding import gamma

LIB = require_native(linear16.load)
HAS_BF16_PRODUCTS = bool(LIB.qs16_has_bf16_products())


def _case(T: int, K: int, V: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g) * 2
    w = (torch.randn(V, K, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(V, generator=g)
    return x, w, bias


def _check(out, x, w, bias):
    """out against float64 x . w^T (+ bias): float32 sums of K products and the bias add."""
    exact = x.double() @ w.double().T
    terms = x.double().abs() @ w.double().abs().T
    if bias is not None:
        exact += bias.double()
        terms += bias.double().abs()
    err = (out.double() - exact).abs()
    bound = gamma(x.shape[-1] + 1) * terms
    assert bool((err <= bound).all()), f"max |diff| {err.max().item():.3e}, max excess {(err - bound).max().item():.3e}"


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("T,K,V", [(1, 576, 300), (2, 67, 129), (3, 15, 5), (5, 17, 63), (17, 100, 257),
                                   (64, 576, 131), (4, 1, 9)])
def test_linear_bf16_matches_float64(T, K, V, with_bias):
    x, w, bias = _case(T, K, V, seed=T * 1000 + K + V)
    b = bias if with_bias else None
    out = linear16.linear_bf16(x, w, b, bf16_products=False)
    assert out is not None and out.dtype == torch.float32 and out.shape == (T, V)
    _check(out, x, w, b)


@pytest.mark.skipif(not HAS_BF16_PRODUCTS, reason="CPU without AVX-512-BF16")
@pytest.mark.parametrize("T,K,V", [(1, 576, 300), (5, 17, 63), (64, 576, 131)])
def test_bf16_products_are_the_rounded_rows(T, K, V):
    """With bf16 products the rows are rounded to bf16 (nearest even) and every product is exact:
    the float64 oracle of the rounded rows, within the float32 bound; not the unrounded rows'."""
    x, w, bias = _case(T, K, V, seed=K + V)
    out = linear16.linear_bf16(x, w, bias, bf16_products=True)
    _check(out, x.to(torch.bfloat16).float(), w, bias)
    exact = linear16.linear_bf16(x, w, bias, bf16_products=False)
    assert not torch.equal(out, exact)


def test_leading_dims_and_batch_invariance():
    x, w, bias = _case(13, 576, 1000, seed=7)
    for bf16_products in (False, True) if HAS_BF16_PRODUCTS else (False,):
        full = linear16.linear_bf16(x, w, bias, bf16_products=bf16_products)
        for t in (0, 5, 12):
            alone = linear16.linear_bf16(x[t : t + 1], w, bias, bf16_products=bf16_products)
            assert torch.equal(alone[0], full[t])  # bit-identical whatever the rows beside it
        shaped = linear16.linear_bf16(x.view(1, 13, 576), w, bias, bf16_products=bf16_products)
        assert shaped.shape == (1, 13, 1000) and torch.equal(shaped[0], full)


def test_declines_what_it_does_not_take():
    x, w, _ = _case(2, 16, 8, seed=1)
    assert linear16.linear_bf16(x.double(), w) is None  # float32 activations only
    assert linear16.linear_bf16(x, w.float()) is None  # bf16 weights only
    assert linear16.linear_bf16(x[:, :8], w) is None  # K mismatch
