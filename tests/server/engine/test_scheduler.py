"""Scheduler on plain data (no torch, no model): budgets, chunked prefill, FCFS, preemption."""

from __future__ import annotations

import pytest

from quantserve.server.engine.block_manager import BlockManager
from quantserve.server.engine.scheduler import Scheduler
from quantserve.server.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

EOS = 0


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(bm, max_num_seqs, budget), bm


def seq(n_prompt, rid, max_tokens=8, start=1, **kw):
    return Sequence(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                    eos_token_ids=frozenset({EOS}))


def step(sched, token=5):
    batch = sched.schedule()
    sampled = [token if s else None for s in batch.sample]
    sched.postprocess(batch, sampled)
    return batch


def test_pure_python():
    # The scheduler side never imports torch (it is unit-tested on plain data).
    import quantserve.server.engine.block_manager as bm
    import quantserve.server.engine.scheduler as sc

    for module in (bm, sc):
        assert "import torch" not in open(module.__file__).read()


def test_prefill_then_decode():
    sched, bm = make()
    a = seq(10, "a", max_tokens=3)
    sched.add(a)
    b = step(sched)
    assert b.seqs == [a] and b.num_new_tokens == [10] and b.sample == [True]
    assert a.num_computed_tokens == 10 and a.output_token_ids == [5]
    b = step(sched)
    assert b.num_new_tokens == [1] and a.output_token_ids == [5, 5]
    step(sched)
    assert a.status is SequenceStatus.FINISHED and a.finish_reason is FinishReason.LENGTH
    assert not sched.has_work() and bm.num_free_blocks == bm.num_blocks


def test_chunked_prefill_under_the_token_budget():
    sched, _ = make(budget=16)
    a = seq(40, "a")
    sched.add(a)
    chunks = []
    while a.num_output_tokens == 0:
        b = step(sched)
        chunks.append((b.num_new_tokens[0], b.sample[0]))
    assert chunks == [(16, False), (16, False), (8, True)]


def test_decodes_go_first_and_prefill_takes_what_is_left():
    sched, _ = make(budget=10)
    a = seq(4, "a", max_tokens=50)
    sched.add(a)
    step(sched)
    c = seq(30, "c", start=100)
    sched.add(c)
    b = step(sched)
    assert b.seqs == [a, c] and b.num_new_tokens == [1, 9] and b.sample == [True, False]
    b = step(sched)
    assert b.seqs == [a, c] and b.num_new_tokens == [1, 9]


def test_max_num_seqs():
    sched, _ = make(max_num_seqs=2)
    seqs = [seq(3, f"s{i}", start=10 * i + 1) for i in range(3)]
    for s in seqs:
        sched.add(s)
    b = step(sched)
    assert b.seqs == seqs[:2] and sched.num_waiting == 1


def test_first_come_first_served_nobody_overtakes():
    sched, bm = make(num_blocks=4, block_size=4, budget=100)
    big = seq(12, "big", max_tokens=50)  # 3 blocks
    sched.add(big)
    step(sched)
    head = seq(8, "head", start=100)  # 2 blocks: does not fit (1 free)
    small = seq(2, "small", start=200)  # 1 block: would fit, but must wait its turn
    sched.add(head)
    sched.add(small)
    b = step(sched)
    assert b.seqs == [big] and list(sched.waiting) == [head, small]


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_by_recompute_when_blocks_run_out(caching):
    sched, bm = make(num_blocks=4, block_size=4, budget=100, caching=caching)
    a = seq(8, "a", max_tokens=8)
    b = seq(8, "b", max_tokens=8, start=50)
    sched.add(a)
    sched.add(b)
    step(sched)  # 2 full blocks each; both at 9 tokens now (8 + 1 sampled)
    assert bm.num_free_blocks == 0
    batch = step(sched)  # a needs a 3rd block: b (the latest admitted) is preempted
    assert batch.seqs == [a]
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b]
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_output_tokens == 1
    while a.status is not SequenceStatus.FINISHED:
        step(sched)
    # b comes back: prompt + output so far are recomputed (what the prefix cache kept is reused)
    batch = sched.schedule()
    assert batch.seqs == [b] and batch.sample == [True]
    assert batch.num_new_tokens == [9]  # a reused the blocks b freed: nothing left cached
    assert b.num_output_tokens == 1


def test_preempting_itself_when_alone_is_impossible_but_last_one_yields():
    sched, bm = make(num_blocks=3, block_size=4, budget=100)
    a = seq(4, "a", max_tokens=20)
    b = seq(4, "b", max_tokens=20, start=50)
    c = seq(4, "c", max_tokens=20, start=90)
    for s in (a, b, c):
        sched.add(s)
    step(sched)  # each holds one full block and has sampled a 5th token
    batch = step(sched)
    # a and b each need a block: c is preempted for a, then b preempts itself (nothing later).
    assert batch.seqs == [a]
    assert list(sched.waiting) == [b, c]
    assert sched.num_preemptions == 2


def test_stop_conditions():
    sched, bm = make()
    eos = seq(3, "eos", max_tokens=10)
    stop = seq(3, "stop", max_tokens=10, start=20, stop_token_ids=(9,))
    ignore = seq(3, "ignore", max_tokens=2, start=40, ignore_eos=True)
    for s in (eos, stop, ignore):
        sched.add(s)
    batch = sched.schedule()
    sched.postprocess(batch, [EOS, 9, EOS])
    assert eos.finish_reason is FinishReason.STOP and stop.finish_reason is FinishReason.STOP
    assert ignore.status is SequenceStatus.RUNNING
    step(sched, token=EOS)
    assert ignore.finish_reason is FinishReason.LENGTH and ignore.output_token_ids == [EOS, EOS]
    assert bm.num_free_blocks == bm.num_blocks


def test_context_length_limits_max_tokens():
    s = Sequence("r", [1] * 10, SamplingParams(max_tokens=None), max_model_len=12)
    assert s.max_tokens == 2
    s = Sequence("r", [1] * 10, SamplingParams(max_tokens=1), max_model_len=12)
    assert s.max_tokens == 1


def test_finish_frees_running_and_waiting():
    sched, bm = make(max_num_seqs=1)
    a, b = seq(5, "a"), seq(5, "b", start=30)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(a, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)  # twice is harmless
    assert not sched.has_work() and bm.num_free_blocks == bm.num_blocks
    assert a.finish_reason is FinishReason.ABORT and b.status is SequenceStatus.FINISHED


def test_siblings_share_the_prompt_within_one_step():
    sched, bm = make(block_size=4)
    prompt = list(range(1, 14))  # 3 full blocks + 1 token
    sibs = [Sequence("r", prompt, SamplingParams(n=3), index=i) for i in range(3)]
    for s in sibs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.num_new_tokens == [13, 1, 1]  # the 2nd and 3rd reuse the 1st's full blocks
    assert sibs[1].num_cached_tokens == 12 and sibs[1].block_table[:3] == sibs[0].block_table[:3]
    assert bm.num_blocks - bm.num_free_blocks == 4 + 1 + 1


def test_a_step_with_preemption_admits_nobody():
    sched, bm = make(num_blocks=2, block_size=4, budget=100)
    a = seq(4, "a", max_tokens=20)
    b = seq(4, "b", max_tokens=20, start=50)
    sched.add(a)
    sched.add(b)
    step(sched)
    late = seq(1, "late", start=90)
    sched.add(late)
    batch = step(sched)
    assert batch.seqs == [a] and late in sched.waiting


def test_a_sequence_that_can_never_fit_is_cut_off_not_looped_on():
    sched, bm = make(num_blocks=2, block_size=4, budget=100)
    huge = seq(12, "huge")  # 3 blocks > the whole cache
    grows = seq(7, "grows", max_tokens=20, start=50)  # fits now, outgrows the cache later
    sched.add(huge)
    sched.add(grows)
    batch = sched.schedule()
    assert batch.cut_off == [huge] and huge.finish_reason is FinishReason.LENGTH
    assert batch.seqs == [grows]
    for _ in range(10):
        batch = step(sched)
        if batch.cut_off:
            break
    assert batch.cut_off == [grows] and grows.finish_reason is FinishReason.LENGTH
    assert grows.num_output_tokens == 2  # 8 + 1 tokens fit in 2 blocks, a 10th does not
    assert not sched.has_work() and bm.num_free_blocks == 2
