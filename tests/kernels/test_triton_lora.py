"""The LoRA shrink/expand Triton kernels (kernels/triton/lora.py) under TRITON_INTERPRET=1 on
small fp32/fp16 shapes, against a float64 reference of the same per-row adapter product, within
the rounding bound of the kernels' float32 sums and the store in the output's dtype
(tests/rounding.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ..rounding import UNIT_ROUNDOFF, gamma, matmul_bound
from .triton_helpers import triton_module

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def kl():
    return triton_module("lora", gpu_ok=True)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, a, b, idx, scale, out, offset):
    """float64: out[t, offset:offset+N] += scale[s] * b[s] @ (a[s] @ x[t]) for rows with a slot s;
    with the rounding bound of the kernels: y summed in float32 over K (error e_y), then out +
    scale * (b @ y) in float32 (R products, the scale, the add), stored in out's dtype."""
    want = out.double().clone()
    bound = torch.zeros_like(want)
    N, R = b.shape[1], b.shape[2]
    for t, s in enumerate(idx.tolist()):
        if s < 0:
            continue
        y = a[s].double() @ x[t].double()
        e_y = matmul_bound(a[s], x[t])
        b_abs, sc = b[s].double().abs(), abs(scale[s].item())
        want[t, offset : offset + N] += scale[s].double() * (b[s].double() @ y)
        bound[t, offset : offset + N] = sc * (b_abs @ e_y) + gamma(R + 2) * (
            out[t, offset : offset + N].double().abs() + sc * (b_abs @ (y.abs() + e_y)))
    if out.dtype != torch.float32:  # the final store rounds to out's dtype
        bound += UNIT_ROUNDOFF[out.dtype] * (want.abs() + bound)
    return want, bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("T,K,R,N,M,offset", [(1, 16, 4, 24, 24, 0), (5, 70, 8, 33, 80, 40), (7, 40, 20, 17, 20, 3)])
def test_shrink_expand_equal_float64(kl, dtype, T, K, R, N, M, offset):
    g = torch.Generator().manual_seed(T * 100 + K)
    L = 3
    x = torch.randn(T, K, generator=g).to(dtype)
    a = (torch.randn(L, R, K, generator=g) / K**0.5).to(dtype)
    b = (torch.randn(L, N, R, generator=g) / R**0.5).to(dtype)
    a[1, R // 2 :] = 0  # a smaller rank padded with zeros
    b[1, :, R // 2 :] = 0
    idx = torch.tensor([(t % (L + 1)) - 1 for t in range(T)], dtype=torch.long)  # -1: the base, untouched
    scale = torch.tensor([2.0, 0.5, 1.25])
    out = torch.randn(T, M, generator=g).to(dtype)
    want, bound = _reference(x, a, b, idx, scale, out, offset)
    dev = [t.to(DEVICE) for t in (x, a, b, idx, scale, out)]
    y = kl.lora_shrink(dev[0], dev[1], dev[3], block_r=8, block_k=32)
    got = kl.lora_expand(y, dev[2], dev[3], dev[4], dev[5], offset, block_n=16, block_r=8).cpu()
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), (err.max().item(), (err - bound).max().item())
    base_rows = idx < 0
    assert torch.equal(got[base_rows], out[base_rows])  # rows without adapter untouched
    ys = y.cpu().double()
    for t, s in enumerate(idx.tolist()):
        if s < 0:
            assert torch.equal(ys[t], torch.zeros(R, dtype=torch.float64))
        else:
            assert bool(((ys[t] - a[s].double() @ x[t].double()).abs() <= matmul_bound(a[s], x[t])).all()), t


def test_shape_mismatch_is_refused(kl):
    with pytest.raises(ValueError, match="do not match"):
        kl.lora_shrink(torch.zeros(2, 8), torch.zeros(1, 4, 9), torch.zeros(2, dtype=torch.long))


def test_engine_lora_layer_on_the_triton_path(kl):
    """The engine's LoRA wrapper (server/engine/models/lora_layers.py) with the Triton kernels, as
    it runs on CUDA: a fused q/k/v-shaped linear, adapters targeting different parts (one only v,
    one none of them), rows of the base among them; against float64 of the unmerged LoRA sum."""
    from quantserve.server.engine.lora import GroupWeights, LoRAAdapter, Part
    from quantserve.server.engine.models import lora_layers

    g = torch.Generator().manual_seed(7)
    K, sizes = 24, (16, 8, 8)  # q, k, v columns [0, 16), [16, 24), [24, 32)
    bounds = [(0, 16), (16, 24), (24, 32)]
    weight = torch.randn(sum(sizes), K, generator=g)

    class Base:  # the fused linear under the adapters: a plain float32 matmul
        def __init__(self):
            self.sizes = list(sizes)

        def __call__(self, x):
            return x @ weight.t()

    def adapter(uid, parts_wanted, r):
        a, parts, r0 = [], [], 0
        for i in parts_wanted:
            start, end = bounds[i]
            a.append(torch.randn(r, K, generator=g))
            parts.append(Part(r0, r0 + r, start, end, torch.randn(r, end - start, generator=g) * 0.3))
            r0 += r
        groups = {(0, "qkv"): GroupWeights(torch.cat(a).contiguous(), tuple(parts))} if parts_wanted else {}
        return LoRAAdapter(name=f"a{uid}", path="", rank=r, uid=uid, groups=groups, target_modules=())

    adapters = [adapter(101, [0, 1, 2], 4), adapter(102, [2], 3), adapter(103, [], 2)]
    seq_adapters = [adapters[0], None, adapters[1], adapters[2], adapters[0]]
    counts = [2, 1, 3, 1, 1]  # a prefill of 2 and of 3 tokens among decodes
    state = lora_layers.LoRAState({}, "triton")  # on CPU tensors, through the interpreter
    layer = lora_layers.LoRALinear(Base(), 0, "qkv", state)
    step = lora_layers.step_batch(state, seq_adapters, counts, torch.device(DEVICE))
    x = torch.randn(sum(counts), K, generator=g)
    got = layer(x.to(DEVICE), step).cpu().double()

    want = x.double() @ weight.double().t()
    row = 0
    for ad, n in zip(seq_adapters, counts):
        for t in range(row, row + n):
            gw = None if ad is None else ad.groups.get((0, "qkv"))
            for p in gw.parts if gw is not None else ():
                want[t, p.start : p.end] += (x[t].double() @ gw.a[p.r0 : p.r1].double().t()) @ p.b_t.double()
        row += n
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
