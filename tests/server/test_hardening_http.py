"""The HTTP layer as an attacker and a careless client would use it (issue 25), on real servers and
real sockets: slowloris on headers and on bodies (closed within their deadlines while other
clients are served), the API key checked before any of the body is read (401 while the client is
still sending), the Bearer scheme in any case, /metrics behind the key with --no-metrics-public,
the console's anti-framing headers, the Host check of a key-less server (DNS rebinding), runtime
LoRA loading off by default, and inputs that used to be 500s (a lone surrogate, a logit_bias key
like "²") answered 400 without the tokenizer's internals."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from .serving import API_KEY, MODEL, start_server

HEADER_TIMEOUT, BODY_TIMEOUT = 2.0, 3.0
SLACK = 3.0  # a timer on a busy 2-core machine shared with other work, and the test's own polling


@pytest.fixture(scope="module")
def server():
    with start_server("--no-metrics-public", "--header-timeout", str(HEADER_TIMEOUT),
                      "--body-timeout", str(BODY_TIMEOUT)) as srv:
        yield srv


@pytest.fixture(scope="module")
def open_server():
    with start_server("--allowed-hosts", "gpu-box.lan", api_key=None) as srv:
        yield srv


def _auth(value: str) -> dict[str, str]:
    return {"Authorization": value}


# ---------------------------------------------------------------------------------------- the key


def test_bearer_scheme_in_any_case(server):
    for value in (f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER {API_KEY}", f"Bearer   {API_KEY}"):
        assert httpx.get(server.url + "/v1/models", headers=_auth(value)).status_code == 200, value
    for value in (f"Basic {API_KEY}", "Bearer wrong", f"Bearer{API_KEY}", API_KEY, "Bearer"):
        r = httpx.get(server.url + "/v1/models", headers=_auth(value))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", value
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": API_KEY}).status_code == 200


def test_metrics_behind_the_key_unless_public(server):
    assert httpx.get(server.url + "/metrics").status_code == 401
    r = httpx.get(server.url + "/metrics", headers=server.headers())
    assert r.status_code == 200 and "vllm:num_requests_running" in r.text
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key

    from quantserve.server.config import Settings

    assert Settings().metrics_public is True  # the default: as vLLM, scrapers seldom carry the key


def test_console_cannot_be_framed(server):
    for path in ("/", "/console/app.js"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything until the server closes (or `timeout`), and when it closed (monotonic)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data, time.monotonic()


def test_key_is_checked_before_the_body_is_read(server):
    """An unauthenticated client announcing 6 MiB gets its 401 after sending 64 KiB: the server
    answered without waiting for (or buffering) the rest, and closed the connection."""
    sock = _connect(server)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {6 << 20}\r\n\r\n").encode()
    sock.sendall(head + b"{" + b" " * (64 << 10))
    data, _ = _read_all(sock, 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 401"), data[:200]
    assert b"connection: close" in data.lower()
    assert httpx.get(server.url + "/health").status_code == 200


def test_public_paths_take_no_unauthenticated_body(server):
    """/health and the console are public for GET; a body sent to them (or with OPTIONS) is no
    way around the key: 401 before it is read."""
    for method, path in (("POST", "/health"), ("PUT", "/"), ("POST", "/console/app.js"), ("OPTIONS", "/v1/models"),
                         ("GET", "/health")):
        sock = _connect(server)
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {6 << 20}\r\n\r\n".encode()
                     + b"x" * (64 << 10))
        data, _ = _read_all(sock, 10)
        sock.close()
        assert data.startswith(b"HTTP/1.1 401"), (method, path, data[:100])
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.options(server.url + "/v1/models").status_code != 401  # a preflight (no body) passes


def test_authorized_body_over_the_limit_is_413_unread(server):
    sock = _connect(server)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {64 << 20}\r\n\r\n").encode()
    sock.sendall(head)
    data, _ = _read_all(sock, 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 413"), data[:200]


# ---------------------------------------------------------------------------------------- slowloris


async def _trickle(port: int, head: bytes, drip: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send `head`, then one byte of `drip` every `every` seconds until the server closes; what it
    answered and how long after `head` the connection was closed (limit: gave up)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(head)
    await writer.drain()
    received = b""

    async def read() -> None:
        nonlocal received
        while chunk := await reader.read(65536):
            received += chunk

    reading = asyncio.ensure_future(read())
    try:
        for byte in drip:
            done, _ = await asyncio.wait({reading}, timeout=every)
            if done:
                break
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
        await asyncio.wait_for(reading, max(limit - (time.monotonic() - start), 0.1))
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        reading.cancel()
        writer.close()
    return received, time.monotonic() - start


def test_slow_headers_and_bodies_are_cut_while_others_are_served(server):
    """60 connections trickle their headers and 20 their (authorized) bodies, a byte every 0.3 s;
    meanwhile a chat completion and /health answer as usual. Every trickler is answered 408 and
    closed within its deadline (plus slack), none stays open."""
    port = server.port
    slow_head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    drip_head = b"X-Padding: " + b"a" * 200
    body_head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n").encode()
    drip_body = b" " * 500

    async def normal() -> list[float]:
        times = []
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=60) as http:
            for _ in range(3):
                start = time.monotonic()
                r = await http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
                assert r.status_code == 200, r.text
                assert (await http.get("/health")).status_code == 200
                times.append(time.monotonic() - start)
                await asyncio.sleep(0.5)
        return times

    async def go():
        heads = [_trickle(port, slow_head, drip_head, 0.3, 30) for _ in range(60)]
        bodies = [_trickle(port, body_head, drip_body, 0.3, 30) for _ in range(20)]
        return await asyncio.gather(asyncio.gather(*heads), asyncio.gather(*bodies), normal())

    heads, bodies, times = asyncio.run(go())
    for received, took in heads:
        assert received.startswith(b"HTTP/1.1 408") and b"--header-timeout" in received, received[:200]
        assert took < HEADER_TIMEOUT + SLACK, took
    for received, took in bodies:
        assert received.startswith(b"HTTP/1.1 408") and b"--body-timeout" in received, received[:200]
        assert took < BODY_TIMEOUT + SLACK, took
    assert max(times) < 10, times


def test_kept_alive_connection_gets_the_same_deadline(server):
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = b""
    while b"\r\n\r\n" not in first:
        first += sock.recv(65536)
    head, _, body = first.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200") and len(body) == length
    start = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's first line, then nothing more
    data, closed = _read_all(sock, 20)
    sock.close()
    assert data.startswith(b"HTTP/1.1 408") and closed - start < HEADER_TIMEOUT + SLACK


def test_idle_connection_is_closed_without_a_408(server):
    sock = _connect(server)
    start = time.monotonic()
    data, closed = _read_all(sock, 20)
    sock.close()
    assert data == b"" and closed - start < HEADER_TIMEOUT + SLACK


def test_header_block_over_h11_cap_is_refused(server):
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (32 << 10))
    time.sleep(0.3)  # h11 caps a header block it must wait for (16 KiB)
    sock.sendall(b"a" * (32 << 10) + b"\r\n\r\n")
    data, _ = _read_all(sock, 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 400"), data[:100]


# ---------------------------------------------------------------------------------------- 500s


def _post_raw(server, path: str, text: str) -> httpx.Response:
    return httpx.post(server.url + path, content=text.encode(), timeout=60,
                      headers={**server.headers(), "Content-Type": "application/json"})


def test_lone_surrogates_are_400_without_internals(server):
    cases = {
        "/v1/completions": '{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}' % MODEL,
        "/tokenize": '{"prompt": "a\\udc80"}',
        "/v1/chat/completions": '{"model": "%s", "messages": [{"role": "user", "content": "x\\ud800"}], '
                                '"max_tokens": 2}' % MODEL,
        "/v1/embeddings": '{"model": "%s", "input": "\\udfff"}' % MODEL,
    }
    for path, body in cases.items():
        r = _post_raw(server, path, body)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert "TextEncodeInput" not in r.text and "Union[" not in r.text, r.text
    # errors that quote the client's value: the surrogate is written escaped, not a failed 500
    for path, body in (("/tokenize", '{"model": "\\udc80", "prompt": "x"}'),
                       ("/v1/responses", '{"model": "%s", "input": "x", "previous_response_id": "r\\ud800"}' % MODEL)):
        r = _post_raw(server, path, body)
        assert r.status_code in (400, 404) and "\\u" in r.json()["error"]["message"], (path, r.status_code, r.text)
    ok = _post_raw(server, "/tokenize", '{"prompt": "\\ud83d\\ude00"}')  # a pair (an emoji) is fine
    assert ok.status_code == 200 and ok.json()["count"] >= 1


def test_logit_bias_keys_that_are_digits_but_not_numbers(server):
    for key in ("²", "١٢", "𝟙", "-1", "1.5", ""):
        r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                             "logit_bias": {key: 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", (key, r.text)
    assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------- no key


def test_keyless_server_answers_only_its_own_hosts(open_server):
    port = open_server.port
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}", "10.0.0.7:80",
                 "app.localhost", "gpu-box.lan", f"GPU-BOX.LAN.:{port}"):
        r = httpx.get(open_server.url + "/v1/models", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
    for host in ("attacker.example", f"attacker.example:{port}", "localhost.attacker.example", "127.0.0.1.nip.io",
                 "gpu-box.lan.evil", "[::1", ""):
        r = httpx.get(open_server.url + "/v1/models", headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, r.text)
    # a rebinding page's POST: refused before its body is read
    r = httpx.post(open_server.url + "/v1/chat/completions", headers={"Host": "attacker.example"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400


def test_runtime_lora_loading_is_off_by_default(open_server):
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "x"})):
        r = httpx.post(open_server.url + path, json=body)
        assert r.status_code == 404 and "--enable-lora-runtime-load" in r.json()["error"]["message"], r.text
        assert "/etc" not in r.text
    schema = httpx.get(open_server.url + "/openapi.json").json()
    assert "/v1/load_lora_adapter" not in schema["paths"]


def test_metrics_are_public_without_a_key(open_server):
    assert httpx.get(open_server.url + "/metrics").status_code == 200
    assert json.loads(httpx.get(open_server.url + "/health").text)
