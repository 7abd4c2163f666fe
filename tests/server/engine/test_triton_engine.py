"""The engine with the Triton attention path (attention_backend="triton") run on the CPU through the
Triton interpreter, against the native C++ path on the same random-weight family models: logits of
every computed position under a scheduler that preempts, chunks prefills and hits the prefix cache;
greedy output of the whole AsyncEngine; the CUDA-graph runner's padded static inputs (run without a
graph here: capture itself needs a GPU, tests/server/engine/test_gpu_engine.py).

tests/conftest.py sets TRITON_INTERPRET=1 for the whole run on a machine without a GPU, before
anything imports triton; there these tests must run. On a GPU machine (no interpreter) they skip:
the GPU tests cover the same path there.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch

from quantserve.server.engine import EngineConfig, SamplingParams
from quantserve.server.engine.block_manager import BlockManager
from quantserve.server.engine.cuda_graphs import DecodeGraphs, batch_ladder
from quantserve.server.engine.attention.triton import unusable as triton_unusable
from quantserve.server.engine.model_runner import ModelRunner
from quantserve.server.engine.scheduler import ScheduledBatch, Scheduler
from quantserve.server.engine.sequence import Sequence

from . import family_models as fm
from .conftest import run
from .helpers import assert_blocks_all_free, collect, started

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def interpreted():
    reason = triton_unusable(torch.device("cpu"))
    if reason is not None:
        if not torch.cuda.is_available():
            pytest.fail(f"the Triton interpreter should run here: {reason}")
        pytest.skip(reason)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: see test_families.one_thread
    yield
    torch.set_num_threads(before)


def teacher_forced(model, backend: str, tokens, prompt_lens, num_blocks=9, budget=48):
    """{(sequence, position): logits} from the runner under a scheduler (as test_families.engine_logits)."""
    # float32 KV cache on both paths: the native one would default to bfloat16, Triton's to float32
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=num_blocks, max_num_batched_tokens=budget,
                                             attention_backend=backend, kv_cache_dtype="float32"))
    assert runner.attention_backend == backend
    bm = BlockManager(runner.num_blocks, 16, runner.supports_prefix_caching, sliding_window=runner.sliding_window)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=budget, recompute_above=runner.recompute_above)
    seqs = [Sequence(f"r{i}", t[:n], SamplingParams(max_tokens=len(t) - n, temperature=0, ignore_eos=True))
            for i, (t, n) in enumerate(zip(tokens, prompt_lens))]
    for s in seqs:
        sched.add(s)
    index = {id(s): i for i, s in enumerate(seqs)}
    got = {}
    kinds = set()
    while sched.has_work():
        batch = sched.schedule()
        inputs = runner.inputs(batch, runner.flatten(batch))
        inputs.logit_rows = torch.arange(inputs.input_ids.shape[0])  # every row
        logits = runner.model.forward_logits(inputs, runner.kv_caches)
        order = [i for i, n in enumerate(batch.num_new_tokens) if n == 1] + \
                [i for i, n in enumerate(batch.num_new_tokens) if n != 1]
        row = 0
        for i in order:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            kinds.add("decode" if n == 1 else "continuation" if seq.num_computed_tokens else "prompt")
            for j in range(n):
                got.setdefault((index[id(seq)], seq.num_computed_tokens + j), logits[row + j])
            row += n
        sched.postprocess(batch, [tokens[index[id(s)]][s.num_computed_tokens + n] if sample else None
                                  for s, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample)])
    return got, kinds, sched.num_preemptions


# GQA 32/8 x 64; soft-capping 50 with sliding and global layers (head_dim 256); every layer sliding
# (blocks behind the window freed: their table entries never read), ~40 s in the interpreter: slow set.
@pytest.mark.parametrize("family", ["llama3", "gemma2", pytest.param("mistral", marks=pytest.mark.slow)])
def test_logits_equal_native_path(family):
    model = fm.family_model(family)
    prompts = fm.prompts(count=5)
    g = torch.Generator().manual_seed(3)
    tokens = [p + torch.randint(3, fm.VOCAB, (4,), generator=g).tolist() for p in prompts]
    lens = [len(p) for p in prompts]
    want, _, _ = teacher_forced(model, "native", tokens, lens)
    got, kinds, _ = teacher_forced(model, "triton", tokens, lens)
    assert kinds == {"decode", "prompt", "continuation"}  # chunked prefills and prefix hits continue in the cache
    assert got.keys() == want.keys()
    for key, logits in got.items():
        scale = max(want[key].abs().max().item(), 1.0)
        err = (logits - want[key]).abs().max().item()
        assert err <= 1e-4 * scale, f"{family} sequence/position {key}: max |diff| {err:.2e} (scale {scale:.1f})"


def test_engine_greedy_equals_native_path():
    model = fm.family_model("qwen2.5")  # 14 heads / 2 KV heads: a GQA group of 7
    prompts = fm.prompts(count=5)[:4]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def generate(backend):
        # float32 KV cache on both paths (the native one would default to bfloat16)
        engine = await started(model, None, num_kv_blocks=16, max_num_batched_tokens=48, max_num_seqs=4,
                               kv_cache_dtype="float32", attention_backend=backend)
        try:
            res = await asyncio.gather(*[collect(engine, p, params, f"r{i}", delay=0.01 * i)
                                         for i, p in enumerate(prompts)])
            assert_blocks_all_free(engine)
            return [r.token_ids[0] for r in res]
        finally:
            await engine.shutdown()

    native = run(generate("native"))
    assert run(generate("triton")) == native


def test_padded_decode_inputs_equal_eager_step():
    """The graphs' static buffers, padded to the ladder size (KV slot -1, rows that see no key),
    give the logits of a plain eager step, and padded rows write nothing to the cache."""
    model = fm.family_model("llama3")
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=24, max_num_seqs=8, attention_backend="triton"))
    lens = [5, 17, 33]
    seqs = []
    for i, n in enumerate(lens):  # prefill each prompt, then one decode token each
        seq = Sequence(f"r{i}", list(range(3 + i, 3 + i + n)), SamplingParams(max_tokens=4, temperature=0))
        seq.block_table = list(range(sum(-(-(m + 1) // 16) for m in lens[:i]),
                                     sum(-(-(m + 1) // 16) for m in lens[: i + 1])))[::-1]  # reversed: not in order
        runner.run(ScheduledBatch([seq], [n], [True]))
        seq.num_computed_tokens = n
        seq.token_ids.append(7 + i)
        seqs.append(seq)
    batch = ScheduledBatch(seqs, [1] * 3, [True] * 3)
    graphs = DecodeGraphs(lambda step: runner.model.forward_logits(step, runner.kv_caches),
                          batch_ladder(8), width=4, device=runner.device, splits_for=lambda size: 2)
    host = runner.flatten(batch)
    padded = graphs.replay(host, eager=True)  # padded to 4 rows, 2 splits
    cache_after_padded = runner.cache.tensor.clone()
    eager = runner.model.forward_logits(runner.inputs(batch, host), runner.kv_caches)
    assert padded.shape == eager.shape == (3, fm.VOCAB)
    torch.testing.assert_close(padded, eager, atol=1e-5, rtol=1e-5)
    # the same slots written, nothing else; compared as bytes: never-written blocks hold whatever
    # torch.empty left there, NaN bit patterns included (NaN != NaN failed torch.equal on CI once)
    assert torch.equal(runner.cache.tensor.view(torch.uint8), cache_after_padded.view(torch.uint8))


def test_triton_backend_refused_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in triton_unusable(torch.device("cpu"))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ModelRunner(fm.family_model("llama3"), EngineConfig(num_kv_blocks=4, attention_backend="triton"))
