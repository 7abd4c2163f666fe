"""Process-level robustness of `quantserve serve`, each through a real server process on a port:
a model that cannot be served exits 1 with one line on stderr; an engine that dies makes the
process exit 1 after answering its clients 503; SIGTERM drains streams in flight and exits 0;
bodies over --max-body-bytes get 413 with or without Content-Length; a client that hangs up on a
non-streamed request stops its generation."""

from __future__ import annotations

import json
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

from quantserve.server.testing import ServerProcess, run_serve

MODEL = "SmolLM2-135M-Instruct"
# Small limits: a quick start, and 64-token streams still run for a second or more on a CPU.
SMALL = ("--max-model-len", "512", "--kv-cache-memory", "0.25")
ERROR_PREFIX = "quantserve serve: error:"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _sigterm_with_clients(srv: ServerProcess, clients: list[threading.Thread], client_timeout: float) -> int:
    """SIGTERM with `clients` in flight: they end (within `client_timeout` s), then the server's exit status."""
    srv.send_signal(signal.SIGTERM)
    for t in clients:
        t.join(client_timeout)
    return srv.wait(timeout=60)


def _wrapped(script: Path, *args: str) -> ServerProcess:
    """A server started through `script`, a wrapper that patches the server and then runs
    `quantserve serve` with the arguments it was given."""
    return ServerProcess(*args, command=[sys.executable, str(script)])


def _assert_openai_error(r: httpx.Response, status: int, code: Optional[str] = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def _sse_events(lines) -> Iterator:
    """Parsed `data:` payloads of an SSE stream as they arrive, "[DONE]" kept as the string."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


# --------------------------------------------------------------- a model that cannot be served


def _llama_config(folder: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256)
    config.architectures = ["LlamaForCausalLM"]
    folder.mkdir()
    (folder / "config.json").write_text(config.to_json_string())


def _unknown_arch(folder: Path) -> None:
    # A weight file is present so that the cheap check passes and loading (in the background,
    # with the port open) is what fails: the path where a port used to answer 503 forever.
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "nonexistent_arch",
                                                    "architectures": ["NonexistentForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)


UNSERVABLE = [
    # (name, how to make the folder, words the error line must contain, fails before the port opens)
    ("missing_folder", None, ["does not exist"], True),
    ("no_weights", _llama_config, ["no weights"], True),
    ("unknown_architecture", _unknown_arch, ["nonexistent_arch"], False),
]


@pytest.mark.parametrize("name,make,words,early", UNSERVABLE, ids=[u[0] for u in UNSERVABLE])
def test_unservable_model_exits_1_with_one_line(tmp_path, name, make, words, early):
    folder = tmp_path / name
    if make is not None:
        make(folder)
    srv = ServerProcess(str(folder), *SMALL)
    try:
        code = srv.wait(timeout=60)
    finally:
        srv.kill()
    log = srv.log_text()
    assert code == 1, log[-3000:]
    last = srv.last_log_line()
    assert last.startswith(ERROR_PREFIX), log[-3000:]
    for word in [str(folder), *words]:
        assert word in last, (word, last)
    assert not _port_open(srv.port), "the port still answers after the process exited"
    # The cheap checks run before the port opens; the rest fails in the background and stops uvicorn.
    assert ("Uvicorn running" in log) is (not early), log[-3000:]


def test_taken_port_exits_1_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_serve(*SMALL, "--port", str(port), timeout=60)
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert proc.returncode == 1 and last.startswith(ERROR_PREFIX), proc.stderr[-3000:]
    assert f"127.0.0.1:{port}" in last and "in use" in last, last


# ----------------------------------------------------------------------- the engine thread dies

MAGIC = 1234  # a prompt of MAGIC_LEN copies of this token id kills the engine thread
MAGIC_LEN = 8

_FAULT_WRAPPER = f"""
# Fault injection: a BaseException escapes the engine's per-step `except Exception`, as a real
# fatal fault in the engine thread would (there is no way to cause one on demand from outside).
import sys

import quantserve.server.serve  # noqa: F401 - the server as `quantserve serve` runs it
from quantserve.server.cli import main
from quantserve.server.engine.model_runner import ModelRunner

_run = ModelRunner.run


def run(self, batch):
    if any(seq.token_ids[:{MAGIC_LEN}] == [{MAGIC}] * {MAGIC_LEN} for seq in batch.seqs):
        raise SystemExit("injected engine fault")
    return _run(self, batch)


ModelRunner.run = run
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def test_dead_engine_answers_503_and_exits_nonzero(tmp_path):
    """Fault injection (a real engine fault cannot be triggered on demand): the wrapper patches
    ModelRunner.run to raise SystemExit, which escapes the engine's per-step handler and kills the
    engine thread, when a batch holds the magic prompt. A stream in flight must end with an error
    event, the request that triggered it must get 503 (neither a hang nor a 500), /health must say
    why, and the process must exit non-zero on its own so that a supervisor restarts it."""
    wrapper = tmp_path / "faulty_serve.py"
    wrapper.write_text(textwrap.dedent(_FAULT_WRAPPER))
    srv = _wrapped(wrapper, *SMALL)
    try:
        srv.wait_ready()
        stream_body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to one hundred."}],
                       "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=stream_body) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()
                before = list(_sse_events(next(lines) for _ in range(6)))  # the stream is running
                assert before and all(isinstance(e, dict) and "choices" in e for e in before), before
                fatal = http.post("/v1/completions", json={"model": MODEL, "prompt": [MAGIC] * MAGIC_LEN,
                                                            "max_tokens": 4})
                after = list(_sse_events(lines))  # must end, not hang (the client's timeout is 60 s)
            _assert_openai_error(fatal, 503)
            errors = [e for e in after if isinstance(e, dict) and "error" in e]
            assert errors, f"the stream in flight got no error event: {after[-3:]}"
            # Its status line (200) is long sent: the 503 goes in-band, in OpenAI's error shape.
            assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
            assert errors[0]["error"]["code"] == "service_unavailable", errors[0]
            # Within the exit grace the port still answers, and says why it is not serving; once
            # the process is gone, the exit status below is what matters.
            try:
                health: Optional[httpx.Response] = http.get("/health", timeout=5)
            except httpx.TransportError:
                health = None
            if health is not None:
                assert "engine" in _assert_openai_error(health, 503)["message"]
            try:
                again: Optional[httpx.Response] = http.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            except httpx.TransportError:
                again = None
            if again is not None:
                _assert_openai_error(again, 503)
        code = srv.wait(timeout=30)
    finally:
        srv.kill()
    assert code != 0, srv.log_tail()
    last = srv.last_log_line()
    assert last.startswith(ERROR_PREFIX) and "engine" in last and "injected" in last, last
    assert not _port_open(srv.port)


# ------------------------------------------------------------------------------ SIGTERM while loading

_STUCK_LOADER_WRAPPER = """
# Fault injection: a load that never ends (a huge model, a stalled download), on demand.
import sys
import threading

import quantserve.server.serve as serve
from quantserve.server.cli import main

serve.load_served_model = lambda *args, **kwargs: threading.Event().wait()
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def test_sigterm_while_loading_exits_promptly(tmp_path):
    """Fault injection: the wrapper makes loading block forever. SIGTERM must still stop the
    process at once (the loading thread must not hold the exit), with status 0 as any SIGTERM."""
    wrapper = tmp_path / "stuck_serve.py"
    wrapper.write_text(_STUCK_LOADER_WRAPPER)
    srv = _wrapped(wrapper, *SMALL)
    answers: list[httpx.Response] = []

    def health_answers() -> bool:
        try:
            answers.append(httpx.get(srv.url + "/health", timeout=2))
            return True
        except httpx.TransportError:
            return False

    try:
        srv.wait_ready(timeout=60, ready=health_answers)  # the port is open, the load never ends
        assert "loading" in _assert_openai_error(answers[0], 503)["message"]
        srv.send_signal(signal.SIGTERM)
        code = srv.wait(timeout=20)
    finally:
        srv.kill()
    assert code == 0, srv.log_tail()
    assert not _port_open(srv.port)


# ------------------------------------- one shared server: body limit, disconnects, then SIGTERM


@pytest.fixture(scope="module")
def server():
    # The default --max-body-bytes (8 MiB). The drain limit is far above what the SIGTERM test's
    # streams take even on a busy CI machine (the default is 30 s).
    # Leaving, it must exit 0 on SIGTERM, unless the SIGTERM test has already stopped it (and checked that).
    with ServerProcess(*SMALL, "--shutdown-timeout", "300") as srv:
        yield srv


OVER_LIMIT = 33 * 2**20


def _big_body():
    """A JSON chat request of OVER_LIMIT bytes, in 1 MiB pieces."""
    yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
    for _ in range(OVER_LIMIT // 2**20):
        yield b"a" * 2**20
    yield b'"}]}'


def _raw_chunked_post(port: int, path: str, pieces) -> tuple[int, bytes]:
    """POST with Transfer-Encoding: chunked and no Content-Length, over a raw socket (what the
    client sends is exactly this); stops sending once the server has answered. (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())
        try:
            for piece in pieces:
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: read what it said
        data = b""
        while True:
            try:
                block = s.recv(65536)
            except ConnectionResetError:
                break
            if not block:
                break
            data += block
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, "no response"
    status = int(head.split()[1])
    if b"transfer-encoding: chunked" in head.lower():  # decode the response's own chunking
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            out, rest = out + rest[: int(size, 16)], rest[int(size, 16) + 2:]
        body = out
    return status, body


def test_body_over_limit_gets_413_chunked_or_not(server):
    # Chunked, no Content-Length: the size is only known by counting.
    status, body = _raw_chunked_post(server.port, "/v1/chat/completions", _big_body())
    r = httpx.Response(status, content=body)
    assert _assert_openai_error(r, 413, "request_too_large")["type"] == "invalid_request_error"
    # The same through httpx streaming a generator (it sends chunked).
    r = httpx.post(server.url + "/v1/chat/completions", content=_big_body(), timeout=60,
                   headers={"Content-Type": "application/json"})
    _assert_openai_error(r, 413, "request_too_large")
    # With a Content-Length.
    r = httpx.post(server.url + "/v1/chat/completions", content=b"".join(_big_body()), timeout=60,
                   headers={"Content-Type": "application/json"})
    _assert_openai_error(r, 413, "request_too_large")
    # Under the limit, chunked in many small pieces: the body the app sees is whole.
    small = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                        "max_tokens": 3, "temperature": 0}).encode()
    status, body = _raw_chunked_post(server.port, "/v1/chat/completions",
                                     (small[i:i + 7] for i in range(0, len(small), 7)))
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 3
    # And the server still serves an ordinary request.
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json=json.loads(small))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


def test_client_hangup_on_non_streamed_request_stops_generation(server):
    def wait_for(pred, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return True
            time.sleep(0.1)
        return pred()

    assert wait_for(lambda: server.metric("vllm:num_requests_running") == 0, 30)
    generated_before = server.metric("vllm:generation_tokens_total")
    max_tokens = 450  # at a few dozen tokens/s this would run for many seconds if not aborted
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Write a long essay."}],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_for(lambda: server.metric("vllm:num_requests_running") == 1, 30), "never started"
        time.sleep(0.5)
    # The client is gone: the request must leave the engine and give back its KV blocks.
    assert wait_for(lambda: server.metric("vllm:num_requests_running") == 0
                    and server.metric("vllm:num_requests_waiting") == 0
                    and server.metric("vllm:kv_cache_usage_perc") == 0, 15), server.log_tail(2000)
    generated = server.metric("vllm:generation_tokens_total") - generated_before
    assert 0 < generated < max_tokens, generated  # stopped part-way, not run to the end
    time.sleep(1)  # and it stays stopped
    assert server.metric("vllm:generation_tokens_total") - generated_before == generated


# ------------------------------------------------------------------- SIGTERM with streams in flight


def test_sigterm_drains_streams_then_exits_0(server):
    # Last in this file: it stops the shared server (one server start less).
    srv = server
    max_tokens, n = 64, 3
    results: list = [None] * n
    started = [threading.Event() for _ in range(n)]
    finished = [False] * n  # a finish_reason seen

    def stream(i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me story number {i}."}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        try:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=300) as r:
                for event in _sse_events(r.iter_lines()):
                    events.append(event)
                    choices = event.get("choices") if isinstance(event, dict) else None
                    if choices and choices[0]["finish_reason"]:
                        finished[i] = True
                    if choices and choices[0]["delta"].get("content"):
                        started[i].set()
            results[i] = events
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            results[i] = exc
            started[i].set()

    try:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(120), "a stream never started"
        finished_at_signal = list(finished)
        code = _sigterm_with_clients(srv, threads, 300)
    finally:
        srv.kill()
    assert not any(finished_at_signal), "a stream had finished before SIGTERM: it proves nothing"
    for events in results:
        assert not isinstance(events, Exception), repr(events)
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [e for e in events if isinstance(e, dict)]
        assert not [e for e in chunks if "error" in e], chunks[-3:]
        finishes = [c["finish_reason"] for e in chunks for c in e.get("choices", []) if c.get("finish_reason")]
        assert finishes == ["length"], finishes
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens, chunks[-1]
    assert code == 0, srv.log_tail()
    assert not _port_open(srv.port)


# ------------------------------------------------------- SIGTERM when the drain limit runs out


def test_drain_limit_answers_503_not_a_cancellation(tmp_path):
    """Requests still running when --shutdown-timeout runs out end with 503 and Retry-After (a
    whole response) or an in-band error event and [DONE] (a stream), never with uvicorn cancelling
    them (a 500 and a traceback in the log, or a stream cut short); the process still exits 0."""
    # The engine fails what is left 2 s before the 8 s limit; 1,500 tokens take far longer on a CPU.
    srv = ServerProcess("--max-model-len", "2048", "--kv-cache-memory", "0.25", "--shutdown-timeout", "8")
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Count to one thousand."}],
           "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    whole: list = [None]
    events: list = []
    streaming = threading.Event()

    def post() -> None:
        try:
            whole[0] = httpx.post(srv.url + "/v1/chat/completions", json=ask, timeout=120)
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            whole[0] = exc

    def stream() -> None:
        try:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**ask, "stream": True},
                              timeout=120) as r:
                for event in _sse_events(r.iter_lines()):
                    events.append(event)
                    streaming.set()
        except Exception as exc:  # noqa: BLE001
            events.append(exc)
        streaming.set()

    try:
        srv.wait_ready()
        threads = [threading.Thread(target=post), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert streaming.wait(120), "the stream never started"
        assert whole[0] is None, "the whole request finished before SIGTERM: it proves nothing"
        code = _sigterm_with_clients(srv, threads, 60)
    finally:
        srv.kill()
    r = whole[0]
    assert isinstance(r, httpx.Response), repr(r)
    _assert_openai_error(r, 503, "service_unavailable")
    assert r.headers.get("retry-after"), r.headers
    assert not [e for e in events if isinstance(e, Exception)], events[-3:]
    assert events[-1] == "[DONE]", events[-3:]
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == "service_unavailable", events[-3:]
    finishes = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e.get("choices", [])
                if c.get("finish_reason")]
    assert finishes == [], finishes  # cut by the drain limit, not finished
    log = srv.log_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
