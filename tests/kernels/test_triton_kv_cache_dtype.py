"""The Triton paged-attention kernel on caches in another dtype than the queries (--kv-cache-dtype):
float32 queries on float16 / bfloat16 / fp8 caches, under TRITON_INTERPRET=1, against float64 over
the stored values; the KV write's float16 bytes against torch's .to() (the interpreter rounds only
float16 stores to nearest: see model_runner.triton_fp8_unusable).
TRITON_INTERPRET=1 is set for the whole run by tests/conftest.py on machines without a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from .triton_helpers import triton_module, work_items

from .test_triton_paged_attention import MIXED, keys_view, make_case, reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def kt():
    return triton_module("ops")


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_float32_queries_on_low_precision_cache(kt, cache_dtype, splits):
    """K/V tiles converted to the queries' float32 on load: float32 accuracy over the stored values."""
    H, KVH, D, bs = 4, 2, 32, 16
    q, kc, vc, entries = make_case(MIXED, H, KVH, D, bs, torch.float32, window=0)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    block_q = kt.default_block_q(H // KVH, 16)
    work, tables = work_items(entries, block_q)
    out = kt.paged_attention(q, keys_view(kc), vc, work, tables, D**-0.5, block_q=block_q, splits=splits, block_n=16)
    assert out.dtype == torch.float32
    expected = reference(q, kc.float(), vc.float(), entries, D**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def test_write_kv_rounds_float32_to_float16_cache(kt):
    blocks, KVH, D, bs = 20, 2, 32, 4
    k, v = torch.randn(64, KVH, D) * 100, torch.randn(64, KVH, D) / 100
    kc = torch.zeros(blocks, KVH, D, bs, dtype=torch.float16)
    vc = torch.zeros(blocks, bs, KVH, D, dtype=torch.float16)
    slots = torch.randperm(blocks * bs, generator=torch.Generator().manual_seed(0))[:64]
    kt.write_kv(k, v, keys_view(kc), vc, slots)
    assert torch.equal(keys_view(kc)[slots // bs, slots % bs].view(torch.int16), k.half().view(torch.int16))
    assert torch.equal(vc.view(-1, KVH, D)[slots].view(torch.int16), v.half().view(torch.int16))


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_engine_refuses_fp8_cache_on_the_interpreter(name):
    """fp8 with the Triton path on a CPU: refused at startup with the reason (never changed silently)."""
    from quantserve.server.engine import EngineConfig
    from quantserve.server.engine.attention.triton import unusable
    from quantserve.server.engine.model_runner import ModelRunner

    from ..server.engine import family_models as fm

    assert unusable(torch.device("cpu")) is None  # the interpreter is on (tests/conftest.py)
    model = fm.family_model("llama3")
    with pytest.raises(ValueError, match=f"kv_cache_dtype '{name}' with the Triton attention: .*round"):
        ModelRunner(model, EngineConfig(num_kv_blocks=4, attention_backend="triton", kv_cache_dtype=name))
    for wanted, dtype in (("auto", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        runner = ModelRunner(model, EngineConfig(num_kv_blocks=4, attention_backend="triton", kv_cache_dtype=wanted))
        assert runner.kv_dtype == dtype
