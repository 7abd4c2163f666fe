"""LoRA in the scheduler and block manager, on plain data (no torch): --max-loras bounds the
distinct adapters among running sequences (the others wait, in order, and all finish); prefix
cache entries never cross adapters."""

from __future__ import annotations

from types import SimpleNamespace

from quantserve.server.engine.block_manager import BlockManager
from quantserve.server.engine.scheduler import Scheduler
from quantserve.server.engine.sequence import SamplingParams, Sequence, SequenceStatus


def seq(rid, lora_uid=None, n_prompt=6, max_tokens=3, start=1):
    lora = None if lora_uid is None else SimpleNamespace(uid=lora_uid)
    return Sequence(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens), lora=lora)


def test_max_loras_bounds_running_adapters_and_everyone_finishes():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_loras=2)
    seqs = [seq("a1", 1), seq("a2", 2), seq("a3", 3), seq("base"), seq("a1b", 1), seq("a3b", 3)]
    for s in seqs:
        sched.add(s)
    admitted_order = []
    for _ in range(50):
        if not sched.has_work():
            break
        batch = sched.schedule()
        admitted_order += [s.request_id for s in batch.seqs if s.request_id not in admitted_order]
        running = {s.lora_id for s in sched.running if s.lora_id}
        assert len(running) <= 2, running
        assert len({s.lora_id for s in batch.seqs if s.lora_id}) <= 2
        sched.postprocess(batch, [7 if x else None for x in batch.sample])
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    # a3 and a3b waited for a slot (passed over, not dropped), then ran in arrival order
    assert admitted_order == ["a1", "a2", "base", "a1b", "a3", "a3b"]
    assert bm.num_free_blocks == bm.num_blocks


def test_without_limit_all_adapters_run_together():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(5):
        sched.add(seq(f"r{i}", i + 1))
    assert len(sched.schedule().seqs) == 5


def test_prefix_cache_keys_on_the_adapter():
    bm = BlockManager(64, 4)
    first = seq("x", 1, n_prompt=13)
    assert bm.allocate(first, first.num_tokens)
    assert len(bm.find_cached_prefix(seq("same", 1, n_prompt=13))) == 3
    assert bm.find_cached_prefix(seq("other", 2, n_prompt=13)) == []
    assert bm.find_cached_prefix(seq("base", None, n_prompt=13)) == []
    base = seq("base2", None, n_prompt=13)
    assert bm.allocate(base, base.num_tokens)
    assert len(bm.find_cached_prefix(seq("base3", None, n_prompt=13))) == 3
    assert bm.find_cached_prefix(seq("other2", 2, n_prompt=13)) == []
