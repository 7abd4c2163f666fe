"""The pure logic of the GPU serving path, checked on the CPU: the CUDA-graph batch ladder and
padding (cuda_graphs.py), the KV budget and the tuning buckets (model_runner.py), the autotuning
cache on disk (kernels/triton/tune_cache.py, on a real Triton autotuner object), and the new
settings. What needs a GPU (capture, replay, tuning runs) is in test_gpu_engine.py."""

from __future__ import annotations

import importlib.util

import pytest

from quantserve.server.engine.config import EngineConfig
from quantserve.server.engine.cuda_graphs import batch_ladder, pad_decode_inputs, padded_size
from quantserve.server.engine.kv_cache import gpu_budget
from quantserve.server.engine.startup import tune_buckets
from quantserve.server.engine.attention.base import SeqRows as Entry
from quantserve.server.engine.attention.triton import block_q_for, work_items


@pytest.mark.parametrize("max_num_seqs, ladder", [
    (1, [1]), (2, [1, 2]), (8, [1, 2, 4, 8]), (48, [1, 2, 4, 8, 16, 32, 48]),
    (256, [1, 2, 4, 8, 16, 32, 64, 128, 256]),
])
def test_batch_ladder(max_num_seqs, ladder):
    assert batch_ladder(max_num_seqs) == ladder


def test_padded_size():
    ladder = batch_ladder(48)
    assert [padded_size(n, ladder) for n in (1, 2, 3, 5, 16, 17, 33, 48, 49)] == [1, 2, 4, 8, 16, 32, 48, 48, None]


def test_pad_decode_inputs():
    host = pad_decode_inputs([11, 12], [4, 20], [36, 99], [5, 21], [[2], [7, 6]], size=4, width=3)
    assert host["input_ids"] == [11, 12, 0, 0]
    assert host["positions"] == [4, 20, 0, 0]
    assert host["slots"] == [36, 99, -1, -1]  # padded rows write no key/value
    # (row, 1 row, position of the row, table offset = row * width); padding sees no key (position -1)
    assert host["work"] == [0, 1, 4, 0, 1, 1, 20, 3, 2, 1, -1, 0, 3, 1, -1, 0]
    assert host["tables"] == [2, 0, 0, 7, 6, 0, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="wider"):
        pad_decode_inputs([1], [0], [0], [1], [[1, 2, 3, 4]], size=1, width=3)
    with pytest.raises(ValueError, match="do not fit"):
        pad_decode_inputs([1, 2], [0, 0], [0, 0], [1, 1], [[1], [2]], size=1, width=3)


def test_work_items_cut_rows_by_block_q():
    entries = [Entry(0, 1, 9, [4]), Entry(1, 10, 30, [1, 2]), Entry(11, 3, 3, [5])]
    work, tables = work_items(entries, block_q=4)
    assert tables == [4, 1, 2, 5]
    assert [work[i : i + 4] for i in range(0, len(work), 4)] == [
        [0, 1, 8, 0],  # a decode: position 8 of a 9-token context
        [1, 4, 20, 1], [5, 4, 24, 1], [9, 2, 28, 1],  # a chunk continuing 20 cached tokens
        [11, 3, 0, 3],  # a fresh prompt
    ]
    assert block_q_for(4, has_prefill=False) == 1 and block_q_for(4, has_prefill=True) == 16
    assert block_q_for(3, has_prefill=True) == 21


def test_kv_budget_and_tune_buckets():
    gib = 2**30
    # vLLM's rule: utilization of the total, less what is in use, the activation peak and the graphs
    assert gpu_budget(140 * gib, 0.9, 6 * gib, 2 * gib, gib) == int(126 * gib) - 9 * gib
    assert tune_buckets(64, 512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert tune_buckets(48, 40) == [1, 2, 4, 8, 16, 32, 64]  # 48 rounds up to the 64 bucket


def test_engine_config_refuses_bad_values():
    assert EngineConfig().attention_backend == "auto" and EngineConfig().enforce_eager is False
    for bad in (dict(attention_backend="flash"), dict(enforce_eager="yes"), dict(forward="native"),
                dict(max_num_seqs=0), dict(max_num_seqs=True), dict(gpu_memory_utilization=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)


def test_serve_flags(monkeypatch):
    import argparse

    from quantserve.server.serve import add_serve_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = settings_from_args(parser.parse_args(
        ["--enforce-eager", "--gpu-memory-utilization", "0.5", "--attention-backend", "torch"]))
    config = EngineConfig.from_settings(settings)
    assert (config.enforce_eager, config.gpu_memory_utilization, config.attention_backend) == (True, 0.5, "torch")
    monkeypatch.setenv("QUANTSERVE_ENFORCE_EAGER", "1")
    assert settings_from_args(parser.parse_args([])).enforce_eager is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "flash"])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_tune_cache_round_trip(tmp_path):
    """Choices saved from one autotuner are restored into a fresh one as the same key tuples and
    config objects of its own list; a config it no longer has is dropped; keyed per GPU name."""
    import triton

    from quantserve.kernels.triton import tune_cache

    def tuner(configs):
        @triton.jit
        def kernel(x_ptr, N, BLOCK: triton.language.constexpr):
            pass

        return triton.autotune(configs=configs, key=["N"])(kernel)

    configs = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=2) for b, w in ((16, 4), (32, 4), (64, 8))]
    first = tuner(configs)
    first.cache[(1024, "torch.float16")] = configs[2]
    first.cache[(8, "torch.bfloat16")] = configs[0]
    first.cache[(2, "torch.float32")] = triton.Config({"BLOCK": 128}, num_warps=4, num_stages=2)  # pruned away
    path = tune_cache.cache_path("NVIDIA H200", root=tmp_path)
    assert path.parent == tmp_path / "autotune" and path.name.startswith("NVIDIA-H200-")
    assert path != tune_cache.cache_path("NVIDIA GeForce RTX 4090", root=tmp_path)
    assert tune_cache.save({"gemv": first}, path) == 3
    fresh = tuner(configs)
    assert tune_cache.load({"gemv": fresh, "gemm": tuner(configs)}, path) == 2
    assert fresh.cache == {(1024, "torch.float16"): configs[2], (8, "torch.bfloat16"): configs[0]}
    assert tune_cache.load({"gemv": fresh}, tmp_path / "missing.json") == 0
