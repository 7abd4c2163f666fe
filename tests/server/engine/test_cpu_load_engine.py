"""A running engine's thread-count controller on the real machine: a busy loop pinned to one of our
CPUs makes it compute with fewer threads, and it comes back when the loop stops."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import torch
from quantserve.server.engine import SamplingParams
from quantserve.server.engine.cpu_load import PROBE_IDLE

from .conftest import run
from .helpers import started


async def _wait_for(engine, predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate(engine.cpu_load_report()):
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.slow
def test_busy_core_lowers_threads_and_idle_raises_them(smollm):
    model, tokenizer = smollm
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs in the affinity mask")
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    async def body():
        engine = await started(model, tokenizer, num_kv_blocks=64, follow_cpu_load=True)
        busy = None
        try:
            params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            prompt = tokenizer("Tell me a long story about a lighthouse.")["input_ids"]

            async def keep_generating():
                i = 0
                while True:  # one stream after another: the engine keeps stepping
                    async for _ in engine.generate(prompt, params, f"r{i}"):
                        pass
                    i += 1

            load = asyncio.create_task(keep_generating())
            try:
                if not await _wait_for(engine, lambda r: r is not None and r["runqueue_delay_share"] is not None
                                       and r["threads"] == 2, 20):
                    pytest.skip(f"the machine is busy before the test starts: {engine.cpu_load_report()}")
                # On one of our CPUs, at our nice value: a niced test run makes a niced loop that
                # competes with the engine's threads as an equal, as an unniced loop does with an
                # unniced server. (An unniced loop against a niced engine starves the thread on
                # that core: a step then takes seconds before the controller, which acts between
                # steps, can see it.)
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                os.sched_setaffinity(busy.pid, {cpus[-1]})
                dropped = await _wait_for(engine, lambda r: r["threads"] == 1, 10)
                report = engine.cpu_load_report()
                assert dropped, f"no fewer threads with a busy core: {report}"
                busy.kill()
                busy.wait()
                busy = None
                back = await _wait_for(engine, lambda r: r["threads"] == 2, 30)
                report = engine.cpu_load_report()
                if not back and (report["idle_cpus"] or 0.0) < PROBE_IDLE:
                    # Right to stay down: another process took the core meanwhile (a shared
                    # machine); the unit tests check what counts as the others' use.
                    pytest.skip(f"other processes kept a core busy after the loop stopped: {report}")
                assert back, f"not back up after the busy loop stopped: {report}"
                assert engine.cpu_load_report()["changes"] >= 2
            finally:
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
            await engine.shutdown()

    try:
        run(body(), timeout=120)
    finally:
        torch.set_num_threads(before)
