"""KV caches in 16-bit and fp8 dtypes: the native kernel (fast and portable code), the PyTorch path
and the KV write, against a float64 oracle computed on the cache values as stored (the rounded
ones), and the write's bytes against torch's own `.to(dtype)`."""

from __future__ import annotations

import pytest
import torch

from quantserve.kernels.cpu import paged_attention as native
from quantserve.server.engine.attention import SeqRows, StepLayout, keys_view

from ...native import require_native
from ...rounding import UNIT_ROUNDOFF
from .test_attention import MIXED, attend, build_step, native_mode, slot_parts  # noqa: F401 - fixture
from .test_sliding_window import check

DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.element_size()])


def rounded(tensors, dtype):
    """The values a cache of `dtype` holds for these float32 tensors (what the oracle sees)."""
    return [t.to(dtype).float() for t in tensors]


def step_in(dtype, seqs, heads, kv_heads, block_size, dim, seed=0, fill=float("nan")):
    """build_step's step with its cache in `dtype` (earlier tokens rounded to it), the full keys /
    values rounded as the cache holds them, and the same cache in float32 holding those values."""
    q, k_new, v_new, k32, v32, meta, full_k, full_v = build_step(seqs, heads, kv_heads, block_size, dim, seed=seed,
                                                                 fill=fill)
    k_cache, v_cache = k32.to(dtype), v32.to(dtype)
    return (q, k_new, v_new, k_cache, v_cache, meta, rounded(full_k, dtype), rounded(full_v, dtype),
            (k_cache.float(), v_cache.float()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (17, 0.0), (0, 30.0), (40, 5.0)])
@pytest.mark.parametrize("heads, kv_heads, block_size, dim", [
    (9, 3, 16, 64),    # the default model's shapes (G = 3)
    (8, 2, 32, 128),   # G = 4, two key groups per block
    (6, 3, 5, 20),     # odd block size and head dim: portable kernels
])
def test_native_cache_dtype_against_float64(native_mode, dtype, window, softcap, heads, kv_heads, block_size, dim):
    """Decodes, fresh prompts and continuations (MIXED) on a cache of `dtype`: within float32
    rounding of float64 attention over the stored values, bit for bit the kernel's result on a
    float32 cache holding the same values, and the new tokens stored as torch rounds them."""
    q, k_new, v_new, k_cache, v_cache, meta, full_k, full_v, (k32, v32) = step_in(
        dtype, MIXED, heads, kv_heads, block_size, dim)
    scale = dim**-0.5
    out = attend("native", q, k_new, v_new, k_cache, v_cache, meta, scale, window, softcap)
    assert out.dtype == torch.float32
    check(out.view(-1, heads, dim), q, MIXED, full_k, full_v, scale, window, softcap)
    blocks, offsets = slot_parts(meta)
    assert torch.equal(as_bits(keys_view(k_cache)[blocks, offsets]), as_bits(k_new.to(dtype)))
    assert torch.equal(as_bits(v_cache[blocks, offsets]), as_bits(v_new.to(dtype)))
    # The float32 kernel on the same stored values: conversion is exact, arithmetic identical.
    same = attend("native", q, k_new.to(dtype).float(), v_new.to(dtype).float(), k32, v32, meta, scale, window,
                  softcap)
    assert torch.equal(out, same)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_cache_dtype_against_float64(dtype):
    """The PyTorch backend (gather + sdpa) on a cache of `dtype`: the same oracle, the same bytes."""
    heads, kv_heads, block_size, dim = 9, 3, 16, 64
    q, k_new, v_new, k_cache, v_cache, meta, full_k, full_v, _ = step_in(
        dtype, MIXED, heads, kv_heads, block_size, dim, fill=0.0)
    scale = dim**-0.5
    for window, softcap in [(0, 0.0), (17, 30.0)]:
        out = attend("torch", q, k_new, v_new, k_cache, v_cache, meta, scale, window, softcap)
        check(out.view(-1, heads, dim), q, MIXED, full_k, full_v, scale, window, softcap)
    blocks, offsets = slot_parts(meta)
    assert torch.equal(as_bits(keys_view(k_cache)[blocks, offsets]), as_bits(k_new.to(dtype)))
    assert torch.equal(as_bits(v_cache[blocks, offsets]), as_bits(v_new.to(dtype)))


def special_values(n: int = 4096) -> torch.Tensor:
    """Float32 values that exercise rounding: random magnitudes over the formats' ranges,
    subnormals, exact ties between neighbours, the largest finite values and beyond, zeros."""
    g = torch.Generator().manual_seed(3)
    mags = torch.exp2(torch.empty(n).uniform_(-30, 20, generator=g)) * torch.randn(n, generator=g).sign()
    ties = []
    for dtype in DTYPES:  # midpoints of neighbouring values of each format: round to even
        grid = torch.arange(0, 256 if dtype.itemsize == 1 else 65536, 97, dtype=torch.int32)
        vals = grid.to(torch.uint8 if dtype.itemsize == 1 else torch.int16).view(dtype).float()
        nxt = (grid + 1).to(torch.uint8 if dtype.itemsize == 1 else torch.int16).view(dtype).float()
        mid = (vals + nxt) / 2
        ties.append(mid[torch.isfinite(mid)])
    extra = torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 480.0, 1e4, -1e5, 57344.0, 61440.0, 65504.0, 65520.0,
                          1e38, 2.0**-9, 2.0**-10, 2.0**-16, 2.0**-17, 2.0**-24, 2.0**-25, 1e-40, -3e-39])
    return torch.cat([mags, *ties, extra])


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES], ids=str)
@pytest.mark.parametrize("block_size, dim", [(16, 64), (5, 20)])
def test_write_kv_bytes_equal_torch_rounding(dtype, block_size, dim):
    """qs_write_kv's stored bytes equal torch's `.to(dtype)` of the same float32 values (round to
    nearest even, fp8 e4m3fn saturating as torch 2.13 does), keys transposed within their block."""
    require_native(native.load)
    kv_heads = 3
    vals = special_values()
    per = kv_heads * dim
    T = vals.numel() // per
    k = vals[: T * per].view(T, kv_heads, dim)
    v = vals.flip(0)[: T * per].view(T, kv_heads, dim)
    num_blocks = -(-T // block_size) + 3
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(1))[:T].contiguous()
    k_cache = torch.zeros(num_blocks, kv_heads, dim, block_size, dtype=dtype)
    v_cache = torch.zeros(num_blocks, block_size, kv_heads, dim, dtype=dtype)
    assert native.write_kv(k, v, k_cache, v_cache, slots)
    blocks, offsets = slots // block_size, slots % block_size
    assert torch.equal(as_bits(keys_view(k_cache)[blocks, offsets]), as_bits(k.to(dtype)))
    assert torch.equal(as_bits(v_cache[blocks, offsets]), as_bits(v.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_native_rows_independent_of_batch(native_mode, dtype):
    """A row's result does not depend on what else is in the step: each sequence of a mixed step
    alone, bit for bit its rows in the whole step (enough decodes that none is split over keys,
    as in a served batch; a prompt's rows whatever the tiles beside them)."""
    heads, kv_heads, block_size, dim = 9, 3, 16, 64
    seqs = [(c, 1) for c in (0, 14, 15, 16, 17, 31, 64, 100, 150, 299, 47, 20)] + [(0, 40), (30, 33), (16, 16)]
    q, k_new, v_new, k_cache, v_cache, meta, _, _, _ = step_in(dtype, seqs, heads, kv_heads, block_size, dim)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole = attend("native", q, k_new, v_new, k_cache.clone(), v_cache.clone(), meta, dim**-0.5)
        nd = meta.num_decodes
        # the decodes without the prompts, and the prompts without the decodes (the cache already
        # holds every new token after the first call, so later calls only attend)
        k2, v2 = k_cache.clone(), v_cache.clone()
        attend("native", q, k_new, v_new, k2, v2, meta, dim**-0.5)
        decodes = StepLayout(meta.seqs[:nd], meta.slots[:nd], nd, block_size)
        alone = attend("native", q[:nd], k_new[:nd], v_new[:nd], k2, v2, decodes, dim**-0.5)
        assert torch.equal(alone, whole[:nd])
        for c in meta.seqs[nd:]:
            rows = slice(c.first_row, c.first_row + c.num_rows)
            one = StepLayout([SeqRows(0, c.num_rows, c.context, c.table)], meta.slots[rows], 0, block_size)
            out = attend("native", q[rows], k_new[rows], v_new[rows], k2, v2, one, dim**-0.5)
            assert torch.equal(out, whole[rows]), (c.first_row, c.num_rows)
    finally:
        torch.set_num_threads(before)



# ------------------------------------------------------------------------------ engine, default model


def logit_errors(model, tokenizer, kv_cache_dtype: str, count: int = 4, max_new: int = 16):
    """Teacher-forced runner logits (prefill chunks of 64, then decodes) of `count` prompts of the
    default model against transformers' float32 logits at every position: the largest |diff| over
    each position's largest |logit|, and over all positions."""
    from .helpers import make_prompts
    from .test_families import engine_logits, hf_generate

    prompts = make_prompts(tokenizer, count)
    refs = [hf_generate(model, p, max_new) for p in prompts]
    tokens = [p + out for p, (out, _) in zip(prompts, refs)]
    got, _, _ = engine_logits(model, tokens, [len(p) for p in prompts], 96, 64, kv_cache_dtype=kv_cache_dtype)
    worst = 0.0
    for i, (toks, (_, want)) in enumerate(zip(tokens, refs)):
        for p in range(len(toks) - 1):
            if (i, p) in got:
                worst = max(worst, (got[(i, p)] - want[p]).abs().max().item() / max(want[p].abs().max().item(), 1.0))
    return worst


# A cache in `dtype` stores every key and value within its unit roundoff u (relative); to first
# order each of the default model's 30 layers passes its attention output's relative error on, so
# the logits move by up to 30 u of their scale: bf16 (u = 2^-8) 0.12, float16 (2^-11) 1.5e-2. A
# wrong slot, scale or dtype conversion moves them by their own size.
ENGINE_LOGIT_TOL = {name: 30 * UNIT_ROUNDOFF[getattr(torch, name)] for name in ("float16", "bfloat16")}


@pytest.mark.parametrize("kv_cache_dtype", ["bfloat16"])
def test_engine_16bit_cache_logits_near_transformers(smollm, kv_cache_dtype):
    """The runner on the default model with the CPU's default cache (bf16), teacher-forced on
    transformers' greedy tokens (prefill chunks reading earlier chunks from the cache, decodes):
    every position's logits within ENGINE_LOGIT_TOL of transformers' float32 ones."""
    model, tokenizer = smollm
    worst = logit_errors(model, tokenizer, kv_cache_dtype, count=2)
    assert worst <= ENGINE_LOGIT_TOL[kv_cache_dtype], worst


# ------------------------------------------------------------------------------ configuration


def test_config_refuses_unknown_dtypes():
    from quantserve.server.engine import EngineConfig

    assert EngineConfig().kv_cache_dtype == "auto"
    for bad in ("int8", "fp8_e4m3fn", "bf16", torch.bfloat16, None):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            EngineConfig(kv_cache_dtype=bad)


@pytest.mark.parametrize("name, dtype", [("auto", None), ("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                         ("float16", torch.float16), ("fp8", torch.float8_e4m3fn),
                                         ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_runner_cache_dtype_and_budget(name, dtype, backend):
    """The names as vLLM's; auto: bfloat16 with the native kernel, the compute dtype (float32) with
    PyTorch's; the same memory budget holds blocks in inverse proportion to the dtype's bytes."""
    from quantserve.server.engine import EngineConfig
    from quantserve.server.engine.model_runner import ModelRunner

    from . import family_models as fm

    if backend == "native":
        require_native(native.load)
    model = fm.family_model("llama3")
    runner = ModelRunner(model, EngineConfig(kv_cache_memory=0.01, kv_cache_dtype=name, attention_backend=backend))
    want = dtype or (torch.bfloat16 if backend == "native" else torch.float32)
    assert runner.kv_dtype == want and runner.cache.tensor.dtype == want
    per_token = 2 * runner.model.num_layers * runner.model.num_kv_heads * runner.model.head_dim
    assert runner.bytes_per_block == 16 * per_token * want.itemsize
    assert runner.num_blocks == int(0.01 * 2**30 // runner.bytes_per_block)
