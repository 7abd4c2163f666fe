"""quantserve on Ray Serve (server/ray/). Without Ray running: build_app's arguments, the prefix
table's rule, the prompt text the router matches, a request forwarded through an app in-process
and the replica header on a plain server. With a real local Ray (slow): every API through Ray's
proxy with the replica named on each response, prefix affinity across two replicas, pinning, and
a replica killed under load (no request hangs; each answered, or 503 with Retry-After) and
replaced by Ray."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from quantserve.server.ray.args import parse_app_args
from quantserve.server.ray.forward import Accepted, ForwardedRequest, Head, prompt_text, serve_forwarded
from quantserve.server.ray.prefix import PrefixTable

# --------------------------------------------------------------------------- build_app's arguments


def test_args_from_the_command_line():
    """`serve run ... key=value` gives strings: read as the Settings field / deployment option."""
    parsed = parse_app_args({"model": "m", "max-model-len": "512", "num_replicas": "2", "quant": "int8",
                             "ray_actor_options": '{"num_cpus": 2}', "cors_origins": "https://a.example,https://b.example",
                             "router_max_imbalance": "3"}, gpu_available=lambda: True)
    settings = parsed.make_settings()
    assert (settings.model, settings.max_model_len, settings.quant) == ("m", 512, "int8")
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert parsed.num_replicas == 2 and parsed.router_max_imbalance == 3
    # CPUs reserved and no GPU: that many compute threads per replica unless cpu_threads says.
    assert parsed.ray_actor_options == {"num_cpus": 2} and settings.cpu_threads == 2


def test_args_default_resources():
    assert parse_app_args({}, gpu_available=lambda: True).ray_actor_options == {"num_gpus": 1}
    on_cpu = parse_app_args({"cpu_threads": 3}, gpu_available=lambda: False)
    assert on_cpu.ray_actor_options == {"num_cpus": 3} and on_cpu.make_settings().cpu_threads == 3
    # device cpu: CPUs even where the cluster has GPUs (and nobody asks whether it does).
    assert parse_app_args({"device": "cpu"}, gpu_available=lambda: pytest.fail("asked")).ray_actor_options == {
        "num_cpus": 1}
    scaled = parse_app_args({"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}})
    assert scaled.num_replicas is None and scaled.autoscaling_config["max_replicas"] == 3


@pytest.mark.parametrize("args, named", [
    ({"modle": "x"}, "modle"),
    ({"port": 9000}, "http_options.port"),
    ({"host": "0.0.0.0"}, "http_options.host"),
    ({"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}, "not both"),
    ({"num_replicas": 0}, "num_replicas"),
    ({"num_replicas": "two"}, "num_replicas"),
    ({"max_model_len": "ten"}, "max_model_len"),
    ({"ray_actor_options": "gpus"}, "ray_actor_options"),
    ({"request_router": "fastest"}, "request_router"),
    ({"assign_timeout_s": 0}, "assign_timeout_s"),
])
def test_args_refused(args, named):
    with pytest.raises(ValueError, match=named):
        parse_app_args(args, gpu_available=lambda: False)


def test_plain_server_never_imports_ray():
    code = ("import sys; import quantserve.server.serve, quantserve.server.cli, quantserve.server.api.app, "
            "quantserve.server.ray, quantserve.server.ray.args, quantserve.server.ray.forward; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- the prefix table


SYSTEM = ["You are a pirate. Answer every question in pirate speech, briefly. " * 2,
          "You are a careful mathematician: show each step and check the result. " * 2,
          "Translate everything the user says into French and say nothing else. " * 2]


def test_rank_prefers_the_longest_prefix_while_balanced():
    table = PrefixTable(block_chars=16)
    table.insert(SYSTEM[0] + "user one", "a")
    table.insert(SYSTEM[1] + "user two", "b")
    assert table.rank(SYSTEM[0] + "another user", {"a": 3, "b": 0}, max_imbalance=4)[0] == "a"
    assert table.rank(SYSTEM[1] + "another user", {"a": 0, "b": 4}, max_imbalance=4)[0] == "b"
    # a holds the whole system prompt, b only its start: the longer match wins.
    table.insert(SYSTEM[0][:40], "b")
    assert table.matched_blocks(SYSTEM[0] + "x", ["a", "b"]) == {"a": len(SYSTEM[0]) // 16, "b": 40 // 16}
    assert table.rank(SYSTEM[0] + "x", {"a": 1, "b": 0}, max_imbalance=4)[0] == "a"


def test_rank_gives_way_to_load():
    table = PrefixTable(block_chars=16)
    table.insert(SYSTEM[0], "a")
    # a is 5 deeper than the lightest: beyond the margin of 4, so the lightest first, a last.
    assert table.rank(SYSTEM[0] + "q", {"a": 5, "b": 0, "c": 1}, max_imbalance=4) == ["b", "c", "a"]


def test_new_prefix_goes_where_fewest_are():
    table = PrefixTable(block_chars=16)
    table.insert(SYSTEM[0], "a")
    table.insert(SYSTEM[1], "a")
    table.insert(SYSTEM[2][:32], "b")
    assert table.rank("A prompt nobody has sent before, long enough.", {"a": 0, "b": 0}, 4)[0] == "b"
    assert table.rank("short", {"a": 2, "b": 1}, 4)[0] == "b"  # no full block: the lighter one


def test_forget_and_eviction():
    table = PrefixTable(block_chars=16, max_entries=8)
    long = SYSTEM[0] * 2
    assert len(table.block_names(long)) > 8
    table.insert(long, "a")
    assert len(table) == 8  # the newest 8 blocks kept: the prompt's start was evicted first
    assert table.matched_blocks(long, ["a"]) == {"a": 0}
    table = PrefixTable(block_chars=16)
    table.insert(SYSTEM[0], "a")
    table.insert(SYSTEM[0], "b")
    table.forget("a")
    assert table.rank(SYSTEM[0], {"b": 0, "c": 0}, 4)[0] == "b"
    table.forget("b")
    assert len(table) == 0


# --------------------------------------------------------------------------- what the router matches


def test_prompt_text():
    chat = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert prompt_text(json.dumps(chat).encode()) == "m\n<system>Be brief.<user>Hi"
    assert prompt_text(b'{"model": "m", "prompt": "Once upon"}') == "m\nOnce upon"
    assert prompt_text(b'{"model": "m", "prompt": [1, 2, 3]}') == "m\n1 2 3 "
    responses = {"model": "m", "instructions": "Be brief.", "input": "Hi"}
    assert prompt_text(json.dumps(responses).encode()) == "m\nBe brief.Hi"
    messages = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]}
    assert prompt_text(json.dumps(messages).encode()) == "m\nBe brief.<user>Hi"
    # Another model (or LoRA adapter) shares no cache: another prefix.
    assert prompt_text(b'{"model": "a", "prompt": "x"}') != prompt_text(b'{"model": "b", "prompt": "x"}')
    for body in (b"", b"not json", b"[1, 2]", b'{"model": "m"}', b"\xff{"):
        assert prompt_text(body) == ""


# --------------------------------------------------------------------------- forwarding, in-process


def _app(seen: list) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        return JSONResponse({"body": (await request.body()).decode(), "query": request.url.query},
                            headers={"x-quantserve-replica": "inner"})

    @app.get("/stream")
    async def stream(request: Request):
        async def events():
            for i in range(3):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0)
            try:
                while True:
                    await asyncio.sleep(0.01)
                    yield "data: more\n\n"
            finally:
                seen.append("closed")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom():
        raise RuntimeError("bug")

    return app


def _request(method: str, path: str, body: bytes = b"", query: bytes = b"") -> ForwardedRequest:
    return ForwardedRequest(method=method, path=path, query_string=query, body=body,
                            headers=[(b"host", b"test"), (b"content-type", b"application/json")])


def test_forward_a_whole_response():
    async def run():
        return [f async for f in serve_forwarded(_app([]), _request("POST", "/echo", b'{"a": 1}', b"x=1"), "r1")]

    accepted, head = asyncio.run(run())
    assert accepted == Accepted("r1")
    assert isinstance(head, Head) and head.status == 200 and not head.more
    assert json.loads(head.body) == {"body": '{"a": 1}', "query": "x=1"}
    # The app's own replica header replaced by the Ray replica's id: one, not two.
    assert [v for k, v in head.headers if k == b"x-quantserve-replica"] == [b"r1"]


def test_forward_a_stream_and_a_client_that_leaves():
    seen: list = []

    async def run():
        frames = serve_forwarded(_app(seen), _request("GET", "/stream"), "r1")
        got = [await frames.__anext__() for _ in range(4)]
        await frames.aclose()  # the client went away
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        return got

    accepted, head, one, two = asyncio.run(run())
    assert head.more and head.body == b"data: 0\n\n" and head.header("content-type").startswith("text/event-stream")
    assert (one, two) == (b"data: 1\n\n", b"data: 2\n\n")
    assert seen == ["closed"]  # the app saw the disconnect and stopped its stream


def test_forward_a_bug_is_a_500():
    async def run():
        return [f async for f in serve_forwarded(_app([]), _request("GET", "/boom"), "r1")]

    _, head = asyncio.run(run())
    assert head.status == 500


def test_plain_server_names_itself():
    """x-quantserve-replica on every response of create_app's app, its guards' answers included."""
    import os
    import socket

    from quantserve.server.api.app import create_app
    from quantserve.server.api.registry import Registry
    from quantserve.server.config import Settings
    from quantserve.server.loading.catalog import build_catalog

    settings = Settings(api_key="k")
    app = create_app(settings, Registry(build_catalog(settings), lambda *_: pytest.fail("no load in this test")))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await client.get("/health"), await client.get("/v1/models")

    health, unauthorized = asyncio.run(run())
    assert (health.status_code, unauthorized.status_code) == (503, 401)  # loading; no key
    for response in (health, unauthorized):
        assert response.headers["x-quantserve-replica"] == f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------- a real Ray (slow)

ray = None
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def ray_app():
    global ray
    ray = pytest.importorskip("ray")
    from quantserve.server.ray.local import local_app

    args = {"num_replicas": 2, "cpu_threads": 1, "kv_cache_memory": 0.25, "max_model_len": 512,
            "api_key": "k", "assign_timeout_s": 20}
    with local_app(args, num_cpus=4) as url:
        yield url


def _chat(url: str, system: str, user: str, max_tokens: int = 4, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=180, headers={"Authorization": "Bearer k", **headers},
                      json={"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})


@pytest.mark.slow
def test_every_api_through_ray(ray_app):
    import anthropic
    import openai

    url = ray_app
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
        temperature=0)
    assert raw.headers["x-quantserve-replica"]
    assert "Paris" in raw.parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
            temperature=0, stream=True) as streamed:
        assert streamed.headers["x-quantserve-replica"]
        text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
    assert text == raw.parse().choices[0].message.content  # greedy: the same answer, streamed through Ray
    assert client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4).choices[0].text
    assert client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=8).output_text is not None
    message = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0).messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Say hi."}])
    assert message.content[0].text
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401  # the key holds through Ray
    for path in ("/health", "/metrics"):
        response = httpx.get(url + path, timeout=30)
        assert response.status_code == 200 and response.headers["x-quantserve-replica"]
    assert "vllm:num_requests_running" in httpx.get(url + "/metrics", timeout=30).text


@pytest.mark.slow
def test_prefix_affinity_and_pinning(ray_app):
    url = ray_app
    systems = [s + f" (assistant {i})" for i, s in enumerate(SYSTEM)] + ["You are terse. " * 10]
    where: dict[int, set[str]] = {i: set() for i in range(len(systems))}
    for user in ("Hello.", "What is 2+2?", "Name a colour."):
        for i, system in enumerate(systems):
            response = _chat(url, system, user)
            assert response.status_code == 200, response.text
            where[i].add(response.headers["x-quantserve-replica"])
    assert all(len(replicas) == 1 for replicas in where.values()), where  # one replica per system prompt
    used = set().union(*where.values())
    assert len(used) == 2, where  # and the prompts spread over both
    for replica in used:  # a request naming a replica goes there, whatever its prefix
        for system in systems:
            assert _chat(url, system, "Hi.", **{"x-quantserve-replica": replica}).headers[
                "x-quantserve-replica"] == replica


@pytest.mark.slow
def test_replica_killed_under_load(ray_app):
    """One of two replicas killed while 24 requests run: none hangs, each is answered or gets a 503
    with Retry-After, and Ray brings the deployment back to two replicas."""
    from quantserve.server.ray.local import kill_replica, replica_ids

    url = ray_app
    before = set(replica_ids())
    assert len(before) == 2
    victim = sorted(before)[0]

    def one(i: int) -> httpx.Response:
        return _chat(url, SYSTEM[i % len(SYSTEM)] + f" #{i % 2}", f"Count to {i}.", max_tokens=24)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(3)
        kill_replica(victim)
        done, not_done = concurrent.futures.wait(futures, timeout=240)
    assert not not_done, f"{len(not_done)} requests hung"
    responses = [f.result() for f in futures]
    failed = [r for r in responses if r.status_code != 200]
    assert all(r.status_code == 503 and r.headers.get("retry-after") for r in failed), [
        (r.status_code, r.text[:200]) for r in failed]
    assert len(failed) <= 2, [r.text[:200] for r in failed]  # the ingress retries what never started
    # Replaced: Ray reports two running replicas again, and a prompt no one sent before goes to the
    # replica holding the fewest prefixes, the new one.
    from ray import serve

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = serve.status().applications["quantserve"].deployments["QuantserveReplica"].replica_states
        alive = set(replica_ids())
        if states == {"RUNNING": 2} and len(alive - {victim}) == 2:
            break
        time.sleep(2)
    assert states == {"RUNNING": 2} and victim not in alive, (states, alive)
    time.sleep(2)  # the ingress's router hears of the new replica
    seen = {_chat(url, f"A prompt no one sent before, number {n}. " * 4, "Hi.").headers["x-quantserve-replica"]
            for n in range(2)}
    assert victim not in seen and seen - before, seen


@pytest.mark.slow
def test_scale_down_drains(ray_app):
    """Two replicas scaled to one while each streams a long answer: both answers finish whole (the
    replica leaving drains before it stops), and one replica is left. Runs last: it changes the app."""
    from ray import serve

    from quantserve.server.ray import build_app
    from quantserve.server.ray.local import APP_NAME, replica_ids

    url = ray_app
    ids = replica_ids()
    assert len(ids) == 2

    def long_answer(replica: str) -> tuple[int, str, int]:
        body = {"model": MODEL, "max_tokens": 96, "ignore_eos": True, "stream": True,
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300,
                          headers={"Authorization": "Bearer k", "x-quantserve-replica": replica}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        usage = next((json.loads(line[6:])["usage"] for line in lines if '"usage"' in line and line != "data: [DONE]"
                      and json.loads(line[6:]).get("usage")), {})
        return response.status_code, lines[-1], usage.get("completion_tokens", 0)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(long_answer, rid) for rid in ids]
        time.sleep(3)  # both streams running
        args = {"num_replicas": 1, "cpu_threads": 1, "kv_cache_memory": 0.25, "max_model_len": 512,
                "api_key": "k", "assign_timeout_s": 20}
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")  # returns once scaled down
        results = [a.result(timeout=300) for a in answers]
    assert results == [(200, "data: [DONE]", 96)] * 2, results
    assert len(replica_ids()) == 1
