"""Fair scheduling across clients on plain data (no torch): a newcomer's first token within one
step of a hog's full batch, max-min shares of the running slots, priorities, the per-client cap,
preemption for KV blocks, the prefill budget left to a newcomer, and fcfs as before."""

from __future__ import annotations

import random

import pytest

from quantserve.server.engine.block_manager import BlockManager
from quantserve.server.engine.scheduler import Scheduler
from quantserve.server.engine.sequence import SamplingParams, Sequence, SequenceStatus

_starts = iter(range(1, 10**9, 1000))  # distinct prompts: no accidental prefix sharing


def make(policy="fair", num_blocks=256, block_size=4, max_num_seqs=8, budget=64, cap=None):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, budget, policy=policy, max_seqs_per_client=cap), bm


def seq(client, rid=None, n_prompt=4, max_tokens=1000, priority=0):
    start = next(_starts)
    return Sequence(rid or client, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens),
                    client=client, priority=priority)


def step(sched):
    batch = sched.schedule()
    sched.postprocess(batch, [7 if s else None for s in batch.sample])
    return batch


def running(sched, client):
    return sum(s.client == client for s in sched.running)


def hog(sched, client="hog", count=16, **kw):
    seqs = [seq(client, f"{client}{i}", **kw) for i in range(count)]
    for s in seqs:
        sched.add(s)
    for _ in range(3):
        step(sched)
    return seqs


def test_a_newcomer_runs_at_the_next_step_of_a_full_batch():
    sched, _ = make()
    hog(sched)
    assert running(sched, "hog") == 8 and sched.num_waiting == 8
    chat = seq("victim", max_tokens=4)
    sched.add(chat)
    batch = step(sched)
    assert chat in batch.seqs and batch.sample[batch.seqs.index(chat)]  # its first token, this step
    assert running(sched, "hog") == 7 and sched.num_preemptions == 1
    preempted = [s for s in sched.waiting if s.num_output_tokens > 0]
    assert len(preempted) == 1 and preempted[0].block_table == []  # the hog's newest, recomputed later
    for _ in range(3):
        step(sched)
    assert chat.status is SequenceStatus.FINISHED and chat.num_output_tokens == 4
    step(sched)
    assert sched.num_preemptions == 1  # no thrashing: nobody else was preempted, the hog took the slot back
    assert running(sched, "hog") == 8


def test_fcfs_keeps_the_newcomer_behind_the_whole_batch():
    sched, _ = make(policy="fcfs")
    hog(sched)
    chat = seq("victim", max_tokens=4)
    sched.add(chat)
    for _ in range(20):
        assert chat not in step(sched).seqs
    assert sched.num_preemptions == 0


def test_shares_are_max_min_fair_while_both_wait():
    sched, _ = make(max_num_seqs=6)
    a = [seq("a", f"a{i}", max_tokens=3) for i in range(12)]
    b = [seq("b", f"b{i}", max_tokens=5) for i in range(4)]
    for s in a + b:  # a arrived first with three times as many
        sched.add(s)
    first = sched.schedule()
    assert [s.client for s in first.seqs] == ["a", "b"] * 3  # alternating, not a's six first
    sched.postprocess(first, [7] * len(first.seqs))
    while sched.has_work():
        waiting = {s.client for s in sched.waiting}
        if waiting == {"a", "b"} and len(sched.running) == 6:
            assert abs(running(sched, "a") - running(sched, "b")) <= 1
        step(sched)
    assert all(s.status is SequenceStatus.FINISHED for s in a + b)


def test_a_client_priority_orders_its_own_requests_only():
    sched, _ = make(max_num_seqs=2)
    a_low = seq("a", "a-low")
    a_high = seq("a", "a-high", priority=-5)
    b = seq("b", "b", priority=10)
    for s in (a_low, a_high, b):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [a_high, b]  # a's urgent one first, but b still gets its share


def test_priority_policy_preempts_a_worse_priority():
    sched, _ = make(policy="priority", max_num_seqs=2)
    low = [seq("a", f"low{i}", priority=5) for i in range(2)]
    for s in low:
        sched.add(s)
    step(sched)
    urgent = seq("a", "urgent", priority=-1)  # the same client: priority is global under this policy
    sched.add(urgent)
    batch = step(sched)
    assert urgent in batch.seqs and low[1] in sched.waiting and sched.num_preemptions == 1
    same = seq("b", "same", priority=5)
    sched.add(same)
    step(sched)
    assert same in sched.waiting  # an equal priority does not preempt


def test_max_seqs_per_client_is_a_hard_cap():
    sched, _ = make(max_num_seqs=8, cap=3)
    hog(sched)
    assert running(sched, "hog") == 3 and len(sched.running) == 3  # slots left free for others
    other = [seq("b", f"b{i}") for i in range(5)]
    for s in other:
        sched.add(s)
    step(sched)
    assert running(sched, "b") == 3 and running(sched, "hog") == 3 and sched.num_preemptions == 0


def test_cap_under_priority_passes_over_and_admits_the_next():
    sched, _ = make(policy="priority", max_num_seqs=8, cap=2)
    for s in [seq("a", f"a{i}") for i in range(4)] + [seq("b", "b0")]:
        sched.add(s)
    step(sched)
    assert running(sched, "a") == 2 and running(sched, "b") == 1


def test_a_newcomer_gets_kv_blocks_from_the_biggest_client():
    # 4 blocks of 4 tokens: the hog's two sequences hold them all.
    sched, bm = make(num_blocks=4, max_num_seqs=8)
    hog(sched, count=2, n_prompt=5)  # 7 tokens computed, the 8th fits in their 2nd blocks
    assert bm.num_free_blocks == 0 and running(sched, "hog") == 2
    chat = seq("victim", n_prompt=3, max_tokens=2)
    sched.add(chat)
    batch = step(sched)
    assert chat in batch.seqs and running(sched, "hog") == 1 and sched.num_preemptions == 1
    while sched.has_work():
        step(sched)
    assert bm.num_free_blocks == bm.num_blocks


def test_running_prefills_leave_budget_to_a_waiting_newcomer():
    sched, _ = make(budget=32)
    long_prompt = seq("hog", "long", n_prompt=200)
    sched.add(long_prompt)
    step(sched)  # the hog's prompt takes whole chunks while nobody else waits
    assert long_prompt.num_computed_tokens == 32
    chat = seq("victim", n_prompt=10, max_tokens=2)
    sched.add(chat)
    batch = step(sched)
    assert batch.seqs == [long_prompt, chat] and batch.num_new_tokens == [22, 10]
    assert batch.sample[1]  # the chat's whole prompt in this step: its first token now
    assert sched.num_preemptions == 0


@pytest.mark.parametrize("policy", ["fair", "priority", "fcfs"])
def test_random_workloads_finish_and_free_everything(policy):
    rng = random.Random(policy)
    sched, bm = make(policy=policy, num_blocks=40, max_num_seqs=6, budget=24, cap=4 if policy != "fcfs" else None)
    seqs = []
    for t in range(400):
        if t < 200 and rng.random() < 0.3:
            s = seq(rng.choice("abc"), f"r{t}", n_prompt=rng.randint(1, 30), max_tokens=rng.randint(1, 20),
                    priority=rng.randint(-1, 1) if policy != "fcfs" else 0)
            seqs.append(s)
            sched.add(s)
        if sched.has_work():
            step(sched)
            if policy != "fcfs":
                assert all(running(sched, c) <= 4 for c in "abc")
    while sched.has_work():
        step(sched)
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert bm.num_free_blocks == bm.num_blocks


def test_one_client_is_first_come_first_served_as_before():
    sched, _ = make(max_num_seqs=2)
    seqs = [seq("", f"s{i}") for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().seqs == seqs[:2] and list(sched.waiting) == seqs[2:]


def test_a_newcomer_is_admitted_even_in_a_step_that_preempts_for_blocks():
    # Under KV pressure most steps preempt a running sequence for another's block: a step that
    # does must still admit a client under its share, else the newcomer could wait for the batch.
    sched, bm = make(num_blocks=5, max_num_seqs=8)
    h0, h1, h2 = seq("hog", "h0", n_prompt=8), seq("hog", "h1", n_prompt=4), seq("hog", "h2", n_prompt=4)
    for s in (h0, h1, h2):
        sched.add(s)
    step(sched)  # 2 + 1 + 1 blocks; each has sampled a token that needs a new block but one
    chat = seq("victim", n_prompt=3, max_tokens=3)
    sched.add(chat)
    batch = step(sched)  # h2 preempted for h1's block, then h1 for the chat's
    assert sched.num_preemptions == 2 and batch.seqs == [h0, chat]
    while sched.has_work():
        step(sched)
    assert chat.num_output_tokens == 3 and bm.num_free_blocks == bm.num_blocks


def test_requests_of_one_client_share_its_slots_too():
    # Clients behind one address (or key) are one client: its requests are told apart, so one
    # n-choice request does not hold another request's first token for its whole length either.
    sched, _ = make(max_num_seqs=8)
    big = [Sequence("big", [1, 2, 3], SamplingParams(n=8, max_tokens=1000), index=i, client="10.0.0.1")
           for i in range(8)]
    for s in big:
        sched.add(s)
    step(sched)
    assert running(sched, "10.0.0.1") == 8
    chat = seq("10.0.0.1", "chat", max_tokens=2)
    sched.add(chat)
    batch = step(sched)
    assert chat in batch.seqs and sched.num_preemptions == 1 and big[7] in sched.waiting  # the newest choice
    # Single-choice requests of one client stay first come first served: nobody is over by more than one.
    sched, _ = make(max_num_seqs=2)
    singles = [seq("10.0.0.1", f"s{i}") for i in range(3)]
    for s in singles:
        sched.add(s)
    step(sched)
    step(sched)
    assert singles[2] in sched.waiting and sched.num_preemptions == 0


def test_a_worse_priority_request_does_not_preempt_its_clients_urgent_one():
    sched, _ = make(max_num_seqs=4)
    urgent = [Sequence("urgent", [1, 2, 3], SamplingParams(n=4, max_tokens=100), index=i, client="a", priority=-1)
              for i in range(4)]
    for s in urgent:
        sched.add(s)
    step(sched)
    later = seq("a", "later", priority=0)
    sched.add(later)
    step(sched)
    assert later in sched.waiting and sched.num_preemptions == 0
