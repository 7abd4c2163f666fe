"""One HTTP request carried from the Ray ingress to a replica and answered there by quantserve's
own FastAPI app, in frames the ingress streams back. No Ray here: the ingress and the replica
(server/ray/deployment.py) call these, and tests run them on an app in-process.

Frames a replica yields, in order:
  1. Accepted(replica): the replica has the request (the ingress's wait for a replica ends);
  2. Head(status, headers, body, more): the response's start with its first body chunk, so that a
     replica dying before the app answered leaves the client nothing sent (retry, or 503);
  3. bytes: the rest of the body (a stream's events) as the app sends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any, AsyncIterator, Optional, Union

logger = logging.getLogger("quantserve.server")

REPLICA_HEADER = "x-quantserve-replica"
_PROMPT_CHARS = 65536  # enough to tell prefixes apart; a long document is not hashed whole


@dataclasses.dataclass
class ForwardedRequest:
    """An HTTP request as the ingress received it. `prompt`: the text the prefix-aware router
    matches (the attribute name Ray's own PrefixCacheAffinityRouter reads too); `replica`: the
    replica the client asked for with x-quantserve-replica (pinned), or None."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: Optional[tuple[str, int]] = None
    prompt: str = ""
    replica: Optional[str] = None


@dataclasses.dataclass
class Accepted:
    replica: str


@dataclasses.dataclass
class Head:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    more: bool

    def header(self, name: str) -> Optional[str]:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)


Frame = Union[Accepted, Head, bytes]


def prompt_text(body: bytes) -> str:
    """The part of a JSON request body that becomes the prompt's start, as text: the model (another
    model or adapter caches nothing in common), then instructions / system / messages / input /
    prompt in that order (chat and completions, Responses, Anthropic Messages). "" when none."""
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\t", b"\r"):
        return ""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    parts = [_text(data.get(key)) for key in ("instructions", "system", "messages", "input", "prompt")]
    text = "".join(parts)
    if not text:
        return ""
    return (f"{data.get('model', '')}\n" + text)[:_PROMPT_CHARS]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):  # token ids
        return f"{value} "
    if isinstance(value, list):
        return "".join(_text(item) for item in value)
    if isinstance(value, dict):
        role = value.get("role")
        inner = value.get("content", value.get("text", value.get("input_text")))
        return (f"<{role}>" if isinstance(role, str) else "") + _text(inner)
    return ""


async def serve_forwarded(app: Any, request: ForwardedRequest, replica: str) -> AsyncIterator[Frame]:
    """Answer `request` with the ASGI `app`, as frames (see the module's docstring). The response
    carries x-quantserve-replica: `replica`. Closing the generator early (the client left) is an
    http.disconnect for the app, which aborts the request in the engine."""
    messages: asyncio.Queue[Optional[dict[str, Any]]] = asyncio.Queue()  # unbounded: the app never waits on us
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.put_nowait(message)

    async def run() -> None:
        try:
            await app(_scope(request), receive, send)
        except Exception:  # noqa: BLE001 - the app's error handlers answer its errors; this is a bug
            logger.exception("forwarded request %s %s failed", request.method, request.path)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        yield Accepted(replica)
        start: Optional[dict[str, Any]] = None
        head_sent = False
        while True:
            message = await messages.get()
            if message is None:  # the app ended without (finishing) a response
                if start is None:
                    yield _internal_error(replica)
                return
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body" and start is not None:
                chunk, more = message.get("body", b""), message.get("more_body", False)
                ended = False
                while more and not messages.empty():  # what queued meanwhile goes as one frame (fewer hops)
                    queued = messages.get_nowait()
                    if queued is None or queued["type"] != "http.response.body":
                        ended = True
                        break
                    chunk += queued.get("body", b"")
                    more = queued.get("more_body", False)
                if not head_sent:
                    yield Head(start["status"], _with_replica(start.get("headers", []), replica), chunk, more)
                    head_sent = True
                elif chunk:
                    yield chunk
                if not more or ended:
                    return
    finally:
        disconnected.set()
        if not task.done():  # let the app see the disconnect and clean up; then stop it
            asyncio.get_running_loop().call_later(5.0, task.cancel)


def _scope(request: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query_string, "root_path": "", "headers": list(request.headers),
        "client": request.client, "server": ("127.0.0.1", 80), "state": {},
    }


def _with_replica(headers: Any, replica: str) -> list[tuple[bytes, bytes]]:
    kept = [(bytes(k), bytes(v)) for k, v in headers if bytes(k).lower() != REPLICA_HEADER.encode()]
    return kept + [(REPLICA_HEADER.encode(), replica.encode())]


def _internal_error(replica: str) -> Head:
    body = json.dumps({"error": {"message": "Internal server error in the replica; this is a bug in quantserve.",
                                 "type": "internal_error", "param": None, "code": "internal_error"}}).encode()
    return Head(500, _with_replica([(b"content-type", b"application/json")], replica), body, False)


def error_response(status: int, message: str, code: str, retry_after: Optional[int] = None,
                   replica: Optional[str] = None) -> Head:
    """An OpenAI-shaped error as the ingress answers it (no replica answered, or it died first)."""
    kind = "service_unavailable" if status == 503 else "internal_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if replica is not None:
        headers.append((REPLICA_HEADER.encode(), replica.encode()))
    return Head(status, headers, body, False)


def stream_error_event(message: str) -> bytes:
    """What a stream whose replica died after its first event ends with: an in-band error event and
    [DONE], as the server itself ends a stream it cannot finish."""
    error = {"error": {"message": message, "type": "service_unavailable", "param": None, "code": "replica_died"}}
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
