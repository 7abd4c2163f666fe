"""One device worker thread stepping several engines (server/engine/device_worker.py): each model's
greedy output is what it gives alone, a busy model does not starve another's first token, an
engine that dies fails only its own requests, and an engine let go is not kept alive."""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import weakref

import pytest

from quantserve.server.engine import AsyncEngine, EngineConfig, SamplingParams
from quantserve.server.engine.device_worker import DeviceWorker
from quantserve.server.engine.errors import EngineDeadError

from .conftest import run
from .helpers import collect, make_prompts

CONFIG = dict(num_kv_blocks=256, max_num_seqs=16)


async def _engines(model, tokenizer, count: int) -> tuple[DeviceWorker, list[AsyncEngine]]:
    worker = DeviceWorker("cpu")
    engines = [AsyncEngine(model, tokenizer, EngineConfig(**CONFIG, model_name=f"m{i}"), worker=worker)
               for i in range(count)]
    for engine in engines:
        await engine.start()
    return worker, engines


def test_engines_on_one_worker_give_their_alone_outputs(smollm):
    model, tokenizer = smollm
    prompts = make_prompts(tokenizer, 3)
    params = SamplingParams(max_tokens=8, temperature=0)

    async def alone():
        engine = AsyncEngine(model, tokenizer, EngineConfig(**CONFIG))
        await engine.start()
        try:
            return [(await collect(engine, p, params, f"r{i}")).token_ids[0] for i, p in enumerate(prompts)]
        finally:
            await engine.shutdown()

    async def shared():
        worker, (a, b) = await _engines(model, tokenizer, 2)
        try:
            results = await asyncio.gather(*(collect(e, p, params, f"{n}{i}")
                                             for n, e in (("a", a), ("b", b)) for i, p in enumerate(prompts)))
            assert worker.alive
            return [r.token_ids[0] for r in results]
        finally:
            await a.shutdown()
            await b.shutdown()

    expected = run(alone())
    assert run(shared()) == expected + expected


def test_a_busy_model_does_not_starve_another_models_first_token(smollm):
    model, tokenizer = smollm
    prompts = make_prompts(tokenizer, 4)

    async def body():
        _, (busy, idle) = await _engines(model, tokenizer, 2)
        stamps: list[float] = []

        async def hog(i: int, prompt: list[int]) -> None:
            async for _ in busy.generate(prompt, SamplingParams(max_tokens=80, ignore_eos=True), f"hog{i}"):
                if i == 0:
                    stamps.append(time.monotonic())

        hogs = [asyncio.create_task(hog(i, p)) for i, p in enumerate(prompts)]
        while len(stamps) < 10:  # the hog's batch is decoding
            await asyncio.sleep(0.01)
        sent = time.monotonic()
        first = None
        async for out in idle.generate(prompts[0], SamplingParams(max_tokens=4), "victim"):
            if first is None and out.outputs and out.outputs[0].token_ids:
                first = time.monotonic()
        ttft = first - sent
        step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        still_running = not all(h.done() for h in hogs)
        await asyncio.gather(*hogs)
        await busy.shutdown()
        await idle.shutdown()
        return ttft, step, still_running

    ttft, step, still_running = run(body())
    assert still_running  # the victim was served while the hog's batch still ran
    # one round = one step of each: the victim's prefill waits for about one hog step, not 70
    assert ttft < 10 * step, (ttft, step)  # starved, it would wait ~70 hog steps


def test_an_engine_that_dies_fails_only_its_own_requests(smollm):
    model, tokenizer = smollm
    prompt = make_prompts(tokenizer, 1)[0]

    async def body():
        worker, (doomed, healthy) = await _engines(model, tokenizer, 2)
        doomed_stream = doomed.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True), "doomed")
        healthy_task = asyncio.create_task(collect(healthy, prompt, SamplingParams(max_tokens=40, ignore_eos=True),
                                                   "fine"))
        original = doomed._drain_inbox

        def broken() -> None:
            original()
            if doomed._num_steps >= 3:
                raise RuntimeError("a bug in the engine loop")

        doomed._drain_inbox = broken
        with pytest.raises(EngineDeadError, match="a bug in the engine loop"):
            async for _ in doomed_stream:
                pass
        result = await healthy_task
        alive, reason = doomed.health()
        assert not alive and "a bug in the engine loop" in reason
        assert healthy.health() == (True, None) and worker.alive
        with pytest.raises(EngineDeadError):
            doomed.generate(prompt, SamplingParams(max_tokens=2), "after")
        again = await collect(healthy, prompt, SamplingParams(max_tokens=4), "again")
        await healthy.shutdown()
        await doomed.shutdown()
        return result, again

    result, again = run(body())
    assert len(result.token_ids[0]) == 40 and result.finish_reason == ["length"]
    assert len(again.token_ids[0]) == 4


def test_an_engine_let_go_is_freed_and_the_last_one_ends_the_thread(smollm):
    model, tokenizer = smollm
    prompt = make_prompts(tokenizer, 1)[0]

    async def body():
        worker, (a, b) = await _engines(model, tokenizer, 2)
        await collect(b, prompt, SamplingParams(max_tokens=3), "b")
        await collect(a, prompt, SamplingParams(max_tokens=3), "a")  # a: the last engine the worker stepped
        await a.shutdown()
        gone = weakref.ref(a)
        del a
        gc.collect()
        freed = gone() is None
        still = worker.alive
        await b.shutdown()
        for _ in range(100):
            if not worker.alive:
                break
            await asyncio.sleep(0.01)
        return freed, still, worker.alive

    freed, alive_with_one, alive_with_none = run(body())
    assert freed  # nothing (a sleeping worker's frame included) keeps an unloaded engine's memory
    assert alive_with_one and not alive_with_none
