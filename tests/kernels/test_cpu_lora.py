"""The native CPU LoRA kernel (kernels/cpu/lora.cpp) against a float64 reference of the same
per-row product, within the float32 rounding bound of its sums (tests/rounding.py): rows of several
adapters and of the base mixed in one call, ranks that differ per adapter, an adapter with several
parts (q, k, v) and one without weights for the linear, K and widths that are not multiples of the
vector width, column ranges inside a wider output, a strided x, float32 and bfloat16 weights, one
and two threads; a row's result independent of its batch; and arguments it must refuse without
writing."""

from __future__ import annotations

import pytest
import torch

from quantserve.kernels.cpu import lora

from ..native import require_native
from ..rounding import gamma, matmul_bound

require_native(lora.load)


def _part(gen, r, k, start, end, dtype=torch.float32):
    a = torch.randn(r, k, generator=gen).to(dtype)
    b_t = (torch.randn(r, end - start, generator=gen) * 0.1).to(dtype)
    return a, b_t, start, end


def _reference(x, out, slot, weights):
    """The float64 result and the float32 rounding bound of the kernel's two sums (tests/rounding.py):
    s = x . A^T over K terms (error e_s), then out + s . Bt over r products plus one add."""
    want = out.double().clone()
    bound = torch.zeros_like(want)
    for t, s in enumerate(slot.tolist()):
        for a, b_t, start, end in weights[s] if s >= 0 else []:
            shrink = x[t].double() @ a.double().t()
            e_s = matmul_bound(x[t], a.t())
            b_abs = b_t.double().abs()
            bound[t, start:end] = e_s @ b_abs + gamma(a.shape[0] + 1) * (
                out[t, start:end].double().abs() + (shrink.abs() + e_s) @ b_abs)
            want[t, start:end] += shrink @ b_t.double()
    return want, bound


def _assert_within(out, want, bound):
    err = (out.double() - want).abs()
    assert bool((err <= bound).all()), f"max |diff| {err.max().item():.3e}, max excess {(err - bound).max().item():.3e}"


def _mixed(k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = 300
    weights = [[_part(gen, 8, k, 0, m, dtype)], [],
               [_part(gen, 24, k, 0, 100, dtype), _part(gen, 4, k, 100, 250, dtype), _part(gen, 8, k, 250, 299, dtype)],
               [_part(gen, 1, k, 299, 300, dtype)]]
    n = 19
    x = torch.randn(n, k, generator=gen)
    out = torch.randn(n, m, generator=gen)
    slot = torch.tensor([(t % 5) - 1 for t in range(n)], dtype=torch.int32)  # -1 (base), 0, 1, 2, 3
    return weights, x, out, slot


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [576, 37])
def test_mixed_rows_match_float64(k, dtype, threads):
    weights, x, out, slot = _mixed(k, dtype)
    want, bound = _reference(x, out, slot, weights)
    base_rows = out[slot == -1].clone()
    assert lora.add(lora.load(), x, out, slot, lora.table(weights), threads=threads)
    _assert_within(out, want, bound)
    assert torch.equal(out[slot == -1], base_rows)  # the base's rows are not touched, not even by +0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_its_batch(dtype):
    """Each row alone gives bit for bit what it gives among the others, on any thread count."""
    weights, x, out, slot = _mixed(576, dtype, seed=3)
    table = lora.table(weights)
    together = out.clone()
    assert lora.add(lora.load(), x, together, slot, table, threads=2)
    for t in range(x.shape[0]):
        alone = out[t : t + 1].clone()
        assert lora.add(lora.load(), x[t : t + 1], alone, slot[t : t + 1], table, threads=1)
        assert torch.equal(alone[0], together[t]), t


def test_strided_x_rows():
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 96, generator=gen)
    x = wide[:, :64]  # row stride 96
    weights = [[_part(gen, 4, 64, 3, 40)]]
    out = torch.zeros(5, 40)
    slot = torch.zeros(5, dtype=torch.int32)
    want, bound = _reference(x, out, slot, weights)
    assert lora.add(lora.load(), x, out, slot, lora.table(weights))
    _assert_within(out, want, bound)


def test_bad_arguments_are_refused_untouched():
    gen = torch.Generator().manual_seed(2)
    weights = [[_part(gen, 4, 16, 0, 8)]]
    x, out = torch.randn(3, 16, generator=gen), torch.randn(3, 8, generator=gen)
    before = out.clone()
    lib = lora.load()
    assert not lora.add(lib, x, out, torch.tensor([0, 1, 0], dtype=torch.int32), lora.table(weights))  # no slot 1
    wide = [[_part(gen, 4, 16, 0, 12)]]  # columns past the output's width
    assert not lora.add(lib, x, out, torch.zeros(3, dtype=torch.int32), lora.table(wide))
    assert torch.equal(out, before)
    with pytest.raises(ValueError):  # mixed dtypes
        lora.table([[_part(gen, 4, 16, 0, 8, torch.bfloat16)], [_part(gen, 4, 16, 0, 8)]])
    with pytest.raises(ValueError):
        lora.table([[(torch.randn(4, 16, dtype=torch.float16), torch.randn(4, 8, dtype=torch.float16), 0, 8)]])
