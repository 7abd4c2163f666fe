"""The engine on the default model: sampling, stops, preemption, cancellation, failures, limits."""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from quantserve.server.engine import EngineOverloadedError, SamplingParams
from quantserve.server.engine import EngineDeadError, RequestFailedError

from .conftest import run
from .helpers import assert_blocks_all_free, collect, make_prompts, started


async def wait_idle(engine, timeout=60.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"engine still busy: {s}"
        await asyncio.sleep(0.02)


def test_seeded_sampling_is_the_same_whatever_the_batch(smollm):
    model, tok = smollm
    prompts = make_prompts(tok, 8)
    seeded = SamplingParams(max_tokens=32, temperature=0.9, top_k=50, top_p=0.95, seed=42, ignore_eos=True)
    others = [
        SamplingParams(max_tokens=40, temperature=1.0),
        SamplingParams(max_tokens=20, temperature=0),
        SamplingParams(max_tokens=30, temperature=0.7, seed=7, min_p=0.05),
        SamplingParams(max_tokens=25, temperature=1.2, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(max_tokens=35, temperature=0.5, top_k=5, frequency_penalty=0.7),
    ]

    async def main():
        engine = await started(model, tok, num_kv_blocks=256, max_num_batched_tokens=128)
        try:
            alone = await collect(engine, prompts[0], seeded, "alone")
            mixed = await asyncio.gather(
                *[collect(engine, prompts[i + 1], p, f"o{i}", delay=0.01 * i) for i, p in enumerate(others)],
                collect(engine, prompts[0], seeded, "again", delay=0.05),
            )
            other_seed = await collect(engine, prompts[0], SamplingParams(
                max_tokens=32, temperature=0.9, top_k=50, top_p=0.95, seed=43, ignore_eos=True), "seed43")
            await wait_idle(engine)
            assert_blocks_all_free(engine)
            return alone, mixed[-1], other_seed
        finally:
            await engine.shutdown()

    alone, again, other_seed = run(main())
    assert len(alone.token_ids[0]) == 32
    assert again.token_ids == alone.token_ids and again.text == alone.text
    assert other_seed.token_ids != alone.token_ids


def test_stop_strings_and_stop_token_ids(smollm):
    model, tok = smollm
    prompt = tok.encode("The lighthouse keeper climbed the spiral stairs", add_special_tokens=False)

    async def main():
        engine = await started(model, tok, num_kv_blocks=128)
        try:
            free = await collect(engine, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), "a")
            text = free.text[0]
            # A stop string that starts inside one token and ends in another.
            ids = free.token_ids[0]
            pieces = [tok.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
            k = next(k for k in range(3, len(ids)) if len(pieces[k + 1]) - len(pieces[k]) >= 3)
            cut = len(pieces[k]) - 1  # last char of token k-1 ...
            stop = text[cut : cut + 3]  # ... through the start of token k
            stopped = await collect(engine, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                                   stop=(stop, "zzzz-never")), "b")
            by_id = await collect(engine, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                                 stop_token_ids=(ids[5],)), "c")
            return text, stop, stopped, by_id, ids
        finally:
            await engine.shutdown()

    text, stop, stopped, by_id, ids = run(main())
    assert stopped.finish_reason == ["stop"]
    assert stopped.text[0] == text[: text.find(stop)]
    assert stop not in stopped.text[0]
    assert by_id.finish_reason == ["stop"] and by_id.token_ids[0] == ids[: ids.index(ids[5]) + 1]


def test_preemption_under_a_tiny_kv_budget_gives_the_same_outputs(smollm):
    model, tok = smollm
    prompts = [p[:60] for p in make_prompts(tok, 8)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def outputs(**config):
        engine = await started(model, tok, **config)
        try:
            res = await asyncio.gather(*[collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)])
            await wait_idle(engine)
            assert_blocks_all_free(engine)
            return [r.token_ids[0] for r in res], engine.stats()
        finally:
            await engine.shutdown()

    roomy, roomy_stats = run(outputs(num_kv_blocks=256, max_num_seqs=8))
    # 8 sequences of up to 100 tokens need ~56 blocks of 16; give them 20.
    tight, tight_stats = run(outputs(num_kv_blocks=20, max_num_seqs=8, max_model_len=128))
    assert roomy_stats.num_preemptions == 0
    assert tight_stats.num_preemptions > 0
    assert tight == roomy


def test_every_way_of_leaving_frees_every_block(smollm):
    model, tok = smollm
    prompts = make_prompts(tok, 6)
    long = SamplingParams(max_tokens=400, temperature=0.8, ignore_eos=True)

    async def main():
        engine = await started(model, tok, num_kv_blocks=200, max_num_seqs=8)
        try:
            # aclose() after two outputs
            s1 = engine.generate(prompts[0], long, "closed")
            await s1.__anext__()
            await s1.__anext__()

            # the reading task is cancelled
            async def reader():
                async for _ in engine.generate(prompts[1], long, "cancelled"):
                    pass

            task = asyncio.create_task(reader())
            # engine.abort() by id: the reader sees finish_reason "abort"
            s3 = engine.generate(prompts[2], long, "aborted")
            # dropped without reading: garbage collection aborts it
            s4 = engine.generate(prompts[3], long, "dropped")
            # n > 1, closed after the first output
            s5 = engine.generate(prompts[4], SamplingParams(n=3, max_tokens=400, temperature=1.0), "siblings")
            await s5.__anext__()
            first = await s3.__anext__()
            assert first.outputs[0].finish_reason is None
            await asyncio.sleep(0.2)
            assert engine.stats().num_running >= 5
            await s1.aclose()
            task.cancel()
            engine.abort("aborted")
            del s4
            gc.collect()
            await s5.aclose()
            last = None
            async for out in s3:
                last = out
            assert last.finished and last.outputs[-1].finish_reason == "abort"
            with pytest.raises(asyncio.CancelledError):
                await task
            # a normal request still completes alongside
            done = await collect(engine, prompts[5], SamplingParams(max_tokens=8, temperature=0), "normal")
            assert done.finish_reason == ["length"]
            await wait_idle(engine)
            assert_blocks_all_free(engine)
            assert engine.stats().kv_cache_usage == 0.0
        finally:
            await engine.shutdown()

    run(main())


def test_n_choices_share_the_prompt_and_logprobs(smollm):
    model, tok = smollm
    prompt = make_prompts(tok, 2)[1]  # a story slice of 40 tokens
    assert len(prompt) >= 33

    async def main():
        # float32 KV cache: the first logprob is compared with transformers' float32 forward (1e-4)
        engine = await started(model, tok, num_kv_blocks=128, kv_cache_dtype="float32")
        try:
            greedy = await collect(engine, prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=3), "g")
            many = await collect(engine, prompt, SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5,
                                                                logprobs=0), "n3")
            return greedy, many, engine.stats()
        finally:
            await engine.shutdown()

    greedy, many, stats = run(main())
    lps = greedy.logprobs[0]
    assert len(lps) == 6
    for tid, lp in zip(greedy.token_ids[0], lps):
        assert lp.token_id == tid and len(lp.top) == 3
        assert lp.top[0][0] == tid and lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    assert lps[0].logprob == pytest.approx(ref[greedy.token_ids[0][0]].item(), abs=1e-4)
    assert len(many.token_ids) == 3 and all(len(t) == 12 for t in many.token_ids)
    assert len({tuple(t) for t in many.token_ids}) > 1
    assert all(len(lp) == 12 and all(x.top == [] for x in lp) for lp in many.logprobs)
    assert many.finish_reason == ["length"] * 3
    assert stats.prefix_cache_hit_rate > 0  # choices 1 and 2 reused the prompt blocks of choice 0


def test_a_repeated_prompt_is_served_from_the_prefix_cache(smollm):
    model, tok = smollm
    prompt = make_prompts(tok, 4)[3]

    async def main():
        engine = await started(model, tok, num_kv_blocks=128)
        try:
            a = await collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0), "a")
            b = await collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0), "b")
            return a, b
        finally:
            await engine.shutdown()

    a, b = run(main())
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
    assert a.token_ids == b.token_ids


def test_a_slow_reader_gets_merged_outputs_and_never_slows_the_others(smollm):
    model, tok = smollm
    prompts = make_prompts(tok, 2)

    async def main():
        engine = await started(model, tok, num_kv_blocks=128)
        try:
            async def slow():
                outs, text, ids = 0, "", []
                async for out in engine.generate(prompts[0], SamplingParams(max_tokens=30, ignore_eos=True,
                                                                            temperature=0), "slow"):
                    outs += 1
                    text += out.outputs[0].text
                    ids += out.outputs[0].token_ids
                    await asyncio.sleep(0.25)
                return outs, text, ids

            slow_task = asyncio.create_task(slow())
            fast = await collect(engine, prompts[1], SamplingParams(max_tokens=30, ignore_eos=True, temperature=0),
                                 "fast")
            assert not slow_task.done()  # the fast one did not wait for the slow reader
            return await slow_task, fast
        finally:
            await engine.shutdown()

    (outs, text, ids), fast = run(main())
    assert len(ids) == 30 and outs < 30
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert len(fast.token_ids[0]) == 30


def test_limits_are_checked_at_submit(smollm):
    model, tok = smollm

    async def main():
        engine = await started(model, tok, num_kv_blocks=64, max_model_len=100, max_num_seqs=4)
        try:
            assert engine.max_model_len == 100
            with pytest.raises(ValueError, match="context length"):
                engine.generate([5] * 90, SamplingParams(max_tokens=11), "long")
            with pytest.raises(ValueError, match="context length"):
                engine.generate([5] * 100, SamplingParams(max_tokens=None), "long2")
            r = await collect(engine, [5] * 90, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True), "fit")
            assert len(r.token_ids[0]) == 10 and r.finish_reason == ["length"]
            with pytest.raises(ValueError, match="token ids"):
                engine.generate([5, 10**6], SamplingParams(), "vocab")
            with pytest.raises(ValueError):
                engine.generate([], SamplingParams(), "empty")
            with pytest.raises(ValueError, match="max_num_seqs"):
                engine.generate([5], SamplingParams(n=5), "n")
        finally:
            await engine.shutdown()
        engine = await started(model, tok, num_kv_blocks=64, max_queue=0)
        try:
            with pytest.raises(EngineOverloadedError) as info:
                engine.generate([5, 6], SamplingParams(), "busy")
            assert info.value.retry_after >= 1
        finally:
            await engine.shutdown()
        with pytest.raises(ValueError, match="KV cache"):
            await started(model, tok, num_kv_blocks=4, max_model_len=100)

    run(main())


def test_a_failing_step_fails_only_its_requests(smollm):
    model, tok = smollm

    async def main():
        engine = await started(model, tok, num_kv_blocks=64)
        real_run = engine.runner.run
        fail = {"on": False}

        def flaky(batch):
            if fail["on"]:
                fail["on"] = False
                raise RuntimeError("injected failure")
            return real_run(batch)

        engine.runner.run = flaky
        try:
            ok = await collect(engine, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0), "before")
            fail["on"] = True
            with pytest.raises(RequestFailedError, match="injected failure"):
                await collect(engine, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0), "victim")
            again = await collect(engine, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0), "after")
            assert again.token_ids == ok.token_ids
            assert engine.health() == (True, None)
            assert_blocks_all_free(engine)
        finally:
            await engine.shutdown()

    run(main())


def test_a_dead_engine_thread_fails_pending_requests_and_reports_it(smollm):
    model, tok = smollm

    class Fatal(BaseException):
        pass

    async def main():
        engine = await started(model, tok, num_kv_blocks=64)
        real = engine.scheduler.schedule
        calls = {"n": 0}

        def dying():
            calls["n"] += 1
            if calls["n"] > 3:
                raise Fatal("scheduler corrupted")
            return real()

        engine.scheduler.schedule = dying
        try:
            with pytest.raises(EngineDeadError, match="scheduler corrupted"):
                await collect(engine, [5, 6, 7], SamplingParams(max_tokens=50, temperature=0), "pending")
            alive, error = engine.health()
            assert not alive and "scheduler corrupted" in error
            with pytest.raises(EngineDeadError):
                engine.generate([5], SamplingParams(), "late")
        finally:
            await engine.shutdown()

    run(main())


def test_requests_submitted_while_the_engine_dies_never_hang(smollm):
    """Submitters race the dying thread: each request is refused at once or its stream raises
    EngineDeadError; none is left in an inbox nobody reads (each wait is bounded)."""
    model, tok = smollm

    class Fatal(BaseException):
        pass

    async def main():
        engine = await started(model, tok, num_kv_blocks=64)
        real = engine.runner.run
        steps = {"n": 0}

        def dying(batch):
            steps["n"] += 1
            if steps["n"] == 4:
                raise Fatal("injected death")
            return real(batch)

        engine.runner.run = dying
        outcomes = {"refused": 0, "failed": 0, "finished": 0, "overloaded": 0}

        async def one(i):
            try:
                stream = engine.generate([5, 6, 7 + i % 50], SamplingParams(max_tokens=8, temperature=0), f"r{i}")
            except EngineDeadError:
                outcomes["refused"] += 1
                return
            except EngineOverloadedError:
                outcomes["overloaded"] += 1
                return
            try:
                async for _ in stream:
                    pass
                outcomes["finished"] += 1
            except EngineDeadError:
                outcomes["failed"] += 1

        async def submitter():
            tasks = []
            after_death = 0
            while after_death < 20:  # keeps submitting across the moment of death, and a little after
                tasks.append(asyncio.ensure_future(asyncio.wait_for(one(len(tasks)), 120)))
                await asyncio.sleep(0.005)
                after_death += not engine.health()[0]
                assert len(tasks) < 5000, "the engine never died"
            await asyncio.gather(*tasks)  # a hang raises TimeoutError here
            return len(tasks)

        try:
            submitted = await submitter()
        finally:
            await engine.shutdown()
        assert not engine.health()[0]
        return submitted, outcomes

    submitted, outcomes = run(main())
    assert sum(outcomes.values()) == submitted
    assert outcomes["refused"] > 0 and outcomes["failed"] + outcomes["finished"] > 0, outcomes


def test_batched_prompts_are_admitted_whole_or_not_at_all(smollm):
    model, tok = smollm
    from quantserve.server.engine import InvalidRequestError

    async def main():
        engine = await started(model, tok, num_kv_blocks=64, max_queue=3, max_n=4)
        try:
            params = SamplingParams(max_tokens=2, temperature=0)
            with pytest.raises(InvalidRequestError) as bad:  # the second prompt is past the vocabulary
                engine.generate_many([[5, 6], [5, engine.vocab_size]], [params] * 2, ["a", "b"])
            assert bad.value.field == "prompt"
            with pytest.raises(InvalidRequestError) as many:  # 2 prompts x n=3 > max_n 4
                engine.generate_many([[5], [6]], [SamplingParams(n=3, max_tokens=2)] * 2, ["c", "d"])
            assert many.value.field == "n"
            with pytest.raises(EngineOverloadedError):  # 4 prompts > a queue of 3, though it is empty
                engine.generate_many([[5]] * 4, [params] * 4, ["e", "f", "g", "h"])
            assert engine.stats().num_waiting == 0  # nothing of the refused calls was queued
            streams = engine.generate_many([[5, 6], [7, 8]], [params] * 2, ["i", "j"])
            for stream in streams:
                outs = [out async for out in stream]
                assert outs[-1].finished and sum(len(c.token_ids) for o in outs for c in o.outputs) == 2
            await wait_idle(engine)
            assert_blocks_all_free(engine)
        finally:
            await engine.shutdown()

    run(main())
