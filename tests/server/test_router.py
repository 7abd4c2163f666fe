"""The routers' protocol: the gauges that llm-d's endpoint picker and vLLM's production-stack
router read on /metrics, with vLLM's meanings (in-process), and a router no one here wrote,
vllm-router with its prefix-aware (cache_aware) policy, in front of two plain `quantserve serve`
processes (slow): every request answered (the SGLang-family fields the router adds accepted), both
servers used, and the gauges each server shows under that load and once idle."""

from __future__ import annotations

import concurrent.futures
import shutil
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quantserve.server.api.metrics import Metrics
from quantserve.server.engine.block_manager import BlockManager
from quantserve.server.engine.outputs import EngineStats
from quantserve.server.engine.sequence import SamplingParams, Sequence
from quantserve.server.testing import ServerProcess, free_port

MODEL = "SmolLM2-135M-Instruct"
LORAS = SimpleNamespace(list=lambda: [])  # the engine's adapter registry, as /v1/memory reads it


def _served(loras: object, running: list, waiting: list) -> SimpleNamespace:
    stats = EngineStats(num_running=len(running), num_waiting=len(waiting), kv_cache_usage=0.25, num_kv_blocks=8,
                        block_size=16, prompt_tokens_total=0, generation_tokens_total=0, num_preemptions=0,
                        prefix_cache_hit_rate=0.0)
    scheduler = SimpleNamespace(running=running, waiting=deque(waiting), max_loras=4)
    engine = SimpleNamespace(stats=lambda: stats, scheduler=scheduler, loras=loras)
    return SimpleNamespace(name=MODEL, engine=engine, load_report=None)


def _samples(served: SimpleNamespace) -> dict[str, list]:
    registry = SimpleNamespace(state="ready", models=lambda: [served], entries=lambda: [], budget_bytes=None)
    text = Metrics(registry).render().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_gauges_the_routers_read():
    """vLLM's names and meanings: requests in the running batch, requests waiting, the share of KV
    blocks held (0..1), and vllm:lora_requests_info: its labels name the adapters with running and
    waiting requests (comma-separated) and max_lora; its value is when it was read (the endpoint
    picker takes the newest sample)."""
    sql, chat = SimpleNamespace(name="sql"), SimpleNamespace(name="chat")
    seqs = lambda *loras: [SimpleNamespace(lora=lora) for lora in loras]  # noqa: E731
    before = time.time()
    samples = _samples(_served(LORAS, running=seqs(sql, None, sql), waiting=seqs(chat, sql)))
    after = time.time()
    assert samples["vllm:num_requests_running"][0].value == 3
    assert samples["vllm:num_requests_waiting"][0].value == 2
    assert samples["vllm:kv_cache_usage_perc"][0].value == 0.25
    (info,) = samples["vllm:lora_requests_info"]
    assert info.labels == {"model_name": MODEL, "max_lora": "4", "running_lora_adapters": "sql",
                           "waiting_lora_adapters": "chat,sql"}
    assert before <= info.value <= after
    idle = _samples(_served(LORAS, running=[], waiting=[]))["vllm:lora_requests_info"][0]
    assert idle.labels == {"model_name": MODEL, "max_lora": "4", "running_lora_adapters": "",
                           "waiting_lora_adapters": ""}
    # An engine that serves no adapters has no such gauge (as vLLM without --enable-lora).
    assert "vllm:lora_requests_info" not in _samples(_served(None, running=[], waiting=[]))


def test_kv_cache_usage_counts_held_blocks_only():
    """vllm:kv_cache_usage_perc is 1 - free/total where cached blocks nobody holds count as free
    (vLLM's block pool: they are evicted on demand), so a finished request's prefix cache reads 0."""
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("r", list(range(10)), SamplingParams())
    assert bm.allocate(seq, seq.num_tokens, bm.find_cached_prefix(seq))
    assert bm.usage == 3 / 8
    bm.free(seq)
    assert bm.usage == 0.0 and len(bm.hash_to_block) == 2  # two full blocks still cached, not counted


# --------------------------------------------------------------------------- vllm-router (slow)


def _vllm_router() -> str:
    exe = shutil.which("vllm-router", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("vllm-router (a test extra) is not installed")
    return exe


SYSTEMS = [f"You are assistant number {i}. " + "Answer in one short sentence, politely and precisely. " * 3
           for i in range(4)]


@pytest.mark.slow
def test_behind_vllm_router_prefix_aware():
    exe = _vllm_router()
    flags = ("--cpu-threads", "1", "--kv-cache-memory", "0.25", "--max-model-len", "512")
    with ServerProcess(*flags, name="backend-a") as a, ServerProcess(*flags, name="backend-b") as b:
        port = free_port()
        router = ServerProcess(command=[exe, "--worker-urls", a.url, b.url, "--policy", "cache_aware",
                                        "--host", "127.0.0.1", "--port", str(port)],
                               port=port, port_flag=False, name="vllm-router", startup_timeout=120)
        with router:
            peaks = {a.url: 0.0, b.url: 0.0}
            stop = threading.Event()

            def watch() -> None:  # the gauges as a router scrapes them, while the load runs
                while not stop.is_set():
                    for server in (a, b):
                        m = server.metrics()
                        busy = m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"]
                        peaks[server.url] = max(peaks[server.url], busy)
                    time.sleep(0.2)

            def one(i: int) -> httpx.Response:
                return httpx.post(router.url + "/v1/chat/completions", timeout=300, json={
                    "model": MODEL, "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "system", "content": SYSTEMS[i % 4]},
                                 {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]})

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    responses = list(pool.map(one, range(32)))
            finally:
                stop.set()
                watcher.join(timeout=10)
            assert [r.status_code for r in responses] == [200] * 32, [r.text[:200] for r in responses
                                                                      if r.status_code != 200]
            assert all(r.json()["choices"][0]["message"]["content"] for r in responses)
            by_prefix: dict[int, Counter] = {i: Counter() for i in range(4)}
            for i, r in enumerate(responses):
                by_prefix[i % 4][r.headers["x-quantserve-replica"]] += 1
            used = set().union(*by_prefix.values())
            assert len(used) == 2, by_prefix  # both servers took requests
            # Not asserted: that cache_aware keeps a prefix on one server. With quantserve behind it, it
            # does not (about half of each prefix's requests on each server, as round robin would):
            # it first asks each worker for vLLM's /v1/chat/completions/render, which quantserve does
            # not serve (docs/scaling.md). Printed for the record (pytest -s).
            print("vllm-router cache_aware, requests per system prompt and server:", by_prefix)
            assert all(peak >= 1 for peak in peaks.values()), peaks  # each server's gauges saw its load
            for server in (a, b):  # and read idle once it is done
                m = server.metrics()
                assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
                assert m["vllm:kv_cache_usage_perc"] == 0
