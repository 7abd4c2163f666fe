"""Structured outputs that finish, and grammars that freeze no one: a real `quantserve serve` on
the default model, the official openai client, json + jsonschema as the judges.

- The battery of issue 25 at temperature 0 and max_tokens 64 and 200: client.chat.completions.parse
  with a City-like pydantic model (strict), json_object, tool_choice "required" and a named
  tool_choice: every constrained answer parses and validates, even when the budget ends it
  (budget-aware closing; finish_reason then stays "length").
- A named tool_choice is exactly one call; "required" one call or more, of distinct functions.
- A request with a huge grammar (100k choices: refused by the cap; an allowed one that takes a
  while to compile) does not hold up another client's /health or chat.
- Distinct large schemas do not grow the server's memory without bound (the cache's byte bound).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .serving import MODEL, QUESTION, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from structured_battery import BATTERY, TOOLS, run_case  # noqa: E402 - shared with bench/structured.py

CACHE_BYTES = 32 * 2**20


@pytest.fixture(scope="module")
def server(default_model_dir):
    with start_server("--grammar-cache-bytes", str(CACHE_BYTES)) as srv:
        yield srv


# ------------------------------------------------------------------------------ the battery


@pytest.mark.parametrize("max_tokens", [64, 200])
@pytest.mark.parametrize("case", sorted(BATTERY))
def test_every_constrained_answer_parses(server, case, max_tokens):
    result = run_case(server.client(), case, max_tokens)
    assert result.ok, result


def test_named_tool_choice_is_exactly_one_call_and_required_distinct_calls(server):
    client = server.client()
    ask = [{"role": "user", "content": "What is the weather and the time in Paris, Rome and Oslo?"}]
    named = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, temperature=0, max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = named.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert named.choices[0].finish_reason == "tool_calls"
    required = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, temperature=0, max_tokens=200,
                                              tool_choice="required")
    names = [c.function.name for c in required.choices[0].message.tool_calls]
    assert 1 <= len(names) <= len(TOOLS) and len(set(names)) == len(names)
    assert required.choices[0].finish_reason == "tool_calls"


def test_closing_keeps_finish_reason_length(server):
    # json_object with a budget the model would spend inside a string: closed, parsed, "length".
    resp = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a cat, as a JSON object."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=24)
    choice = resp.choices[0]
    assert isinstance(json.loads(choice.message.content), dict)
    assert choice.finish_reason == "length" and resp.usage.completion_tokens <= 24


# ------------------------------------------------------------------------------ one request freezes no one


def _timed_health(server, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            start = time.perf_counter()
            http.get(server.url + "/health")
            out.append(time.perf_counter() - start)
            time.sleep(0.02)


def _first_token_time(server) -> float:
    start = time.perf_counter()
    stream = server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0,
                                                     stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            took = time.perf_counter() - start
            break
    else:
        took = time.perf_counter() - start
    for _ in stream:
        pass
    return took


def _big_request(server, raw: bytes, out: dict) -> None:
    """POST the pre-encoded body (encoding 2.4 MB of JSON here would hold this process's GIL while
    the other thread times its first token)."""
    start = time.perf_counter()
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, timeout=120,
                   headers={**server.headers(), "Content-Type": "application/json"})
    out.update(status=r.status_code, body=r.json(), seconds=time.perf_counter() - start)


@pytest.mark.parametrize("kind", ["100k_choices", "slow_schema"])
def test_a_huge_grammar_delays_no_one(server, kind):
    if kind == "100k_choices":  # 2.4 MB body: refused by the size caps, at once
        so = {"choice": [f"option number {i:06d}" for i in range(100_000)]}
    else:  # allowed, and takes ~0.5-3 s to compile on a 2-core CPU
        so = {"json": {"type": "object", "properties": {f"k_{kind}_{i}": {"type": "string", "description": "d" * 90}
                                                          for i in range(2500)}}}
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2, "temperature": 0, "structured_outputs": so}
    raw = json.dumps(body).encode()
    baseline = statistics.median(_first_token_time(server) for _ in range(3))
    health: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=_timed_health, args=(server, stop, health))
    poller.start()
    big: dict = {}
    sender = threading.Thread(target=_big_request, args=(server, raw, big))
    sender.start()
    time.sleep(0.05)
    during = _first_token_time(server)
    sender.join()
    stop.set()
    poller.join()
    if kind == "100k_choices":
        assert big["status"] == 400, big
        message = big["body"]["error"]["message"]
        assert "--max-grammar-bytes" in message or "--max-grammar-choices" in message, message
    else:
        assert big["status"] == 200, big
    print(f"{kind}: big request {big['seconds']:.2f} s; health worst {max(health) * 1e3:.0f} ms over {len(health)}; "
          f"first token {during * 1e3:.0f} ms (alone {baseline * 1e3:.0f} ms)")
    # A freeze, not a latency target: before grammars compiled off the event loop, /health stalled for
    # 24 s and another client's chat took 47 s. The latency figure is a benchmark's (bench/structured.py
    # --delays) on a quiet machine; here other tests and processes share the two cores.
    assert max(health) < 2.0, health
    assert during < baseline + 2.0, (during, baseline)


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_distinct_large_schemas_do_not_grow_memory_without_bound(server):
    http = httpx.Client(timeout=120, headers=server.headers())
    # The 6 MB schemas are refused by the size cap, before anything is compiled or kept.
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 280}
                                             for i in range(20_000)}}
    r = http.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": QUESTION, "max_tokens": 1, "structured_outputs": {"json": huge}})
    assert r.status_code == 400 and "--max-grammar-schema-bytes" in r.json()["error"]["message"]
    sizes = []
    for i in range(24):  # each ~160 kB of schema, ~3.5 MB compiled: the 32 MiB cache holds ~8
        schema = {"type": "object", "properties": {f"s{i}_{j}": {"type": "string", "description": "y" * 60}
                                                   for j in range(1600)}}
        r = http.post(server.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": QUESTION, "max_tokens": 1, "response_format": {
                "type": "json_schema", "json_schema": {"name": "big", "schema": schema}}})
        assert r.status_code == 200, r.text
        sizes.append(_rss_mb(server.pid))
    print("RSS MB after each schema:", [round(s) for s in sizes])
    # Unbounded, the last 14 would add ~14 x 3.5 MB; bounded, the cache turns over.
    assert sizes[-1] - sizes[9] < 30, sizes
