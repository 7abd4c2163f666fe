"""The int8 output head's CPU kernel (kernels/cpu/linear8.cpp) against float64 math on the
dequantized weights: odd sizes, 1..64 rows, with and without bias, both code paths (AVX-512 and
the portable loop), and batch invariance (a row's logits do not depend on the rows beside it)."""

from __future__ import annotations

import pytest
import torch

from quantserve.kernels.cpu import linear8

from ..native import require_native

require_native(linear8.load)


def _case(T: int, K: int, V: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g) * 2
    w = torch.randint(-127, 128, (V, K), generator=g, dtype=torch.int8)
    scale = torch.rand(V, generator=g) * 0.02 + 1e-4
    bias = torch.randn(V, generator=g)
    return x, w, scale, bias


def _oracle(x, w, scale, bias):
    """float64 x . (w * scale)^T + bias: the dequantized weight, exact math."""
    out = x.double() @ (w.double() * scale.double()[:, None]).T
    return out + bias.double() if bias is not None else out


def _tolerance(x, w, scale):
    """float32 sums of K products: a few ulps of the sum of |products| per output."""
    magnitude = x.double().abs() @ (w.double().abs() * scale.double()[:, None]).T
    return 4 * magnitude * torch.finfo(torch.float32).eps * x.shape[-1] ** 0.5 + 1e-6


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("T,K,V", [(1, 576, 300), (2, 67, 129), (3, 15, 5), (5, 17, 63), (17, 100, 257),
                                   (64, 576, 131), (4, 1, 9)])
def test_linear_int8_matches_float64(T, K, V, with_bias, portable):
    if not portable and not linear8.has_avx512():
        pytest.skip("no AVX-512 on this CPU: only the portable loop runs")
    x, w, scale, bias = _case(T, K, V, seed=T * 1000 + K + V)
    b = bias if with_bias else None
    out = linear8.linear_int8(x, w, scale, b, portable=portable)
    assert out is not None and out.dtype == torch.float32 and out.shape == (T, V)
    err = (out.double() - _oracle(x, w, scale, b)).abs()
    assert (err <= _tolerance(x, w, scale)).all(), f"max error {err.max():.3e}"


def test_leading_dims_and_batch_invariance():
    x, w, scale, bias = _case(13, 576, 1000, seed=7)
    full = linear8.linear_int8(x, w, scale, bias)
    for t in (0, 5, 12):
        alone = linear8.linear_int8(x[t : t + 1], w, scale, bias)
        assert torch.equal(alone[0], full[t])  # bit-identical whatever the rows beside it
    shaped = linear8.linear_int8(x.view(1, 13, 576), w, scale, bias)
    assert shaped.shape == (1, 13, 1000) and torch.equal(shaped[0], full)


def test_declines_what_it_does_not_take():
    x, w, scale, _ = _case(2, 16, 8, seed=1)
    assert linear8.linear_int8(x.double(), w, scale) is None  # float32 activations only
    assert linear8.linear_int8(x, w.to(torch.int16), scale) is None
    assert linear8.linear_int8(x, w, scale[:4]) is None  # one scale per row
    assert linear8.linear_int8(x[:, :8], w, scale) is None  # K mismatch
    assert linear8.linear_int8(x, w, scale, torch.zeros(3)) is None  # bias of the wrong size
