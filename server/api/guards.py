"""The ASGI guards that run before any route, outermost first: the Host check (DNS rebinding, only
without an API key), the API key (before any of the body is read), the body's size and time limits.
Each answers in the API's error shape (errors.APIError) without calling the app."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from typing import Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

_PUBLIC_PATHS = ("/health", "/")  # "/": the console's page, which asks for the key itself
_PUBLIC_PREFIXES = ("/console/",)  # the console's static files


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length", b"0").strip()
    return b"transfer-encoding" in headers or not length.isdigit() or int(length) > 0


class HostCheck:
    """Without an API key, nothing but the Host header tells a request from this machine's own
    clients from a web page that pointed its own name at 127.0.0.1 (DNS rebinding: the browser then
    treats the server as that page's origin, and lets the page read the answers). Allowed: localhost
    and *.localhost (browsers resolve them to loopback themselves), IP addresses (a page cannot
    rebind an address: its origin would be the server itself), the --host bound, --allowed-hosts
    ('*': any). A request without Host (HTTP/1.0) is no browser's."""

    def __init__(self, app: ASGIApp, allowed: list[str], bind_host: str) -> None:
        self.app = app
        self.any = "*" in allowed
        self.names = {"localhost", bind_host.lower().rstrip("."), *(h.lower().rstrip(".") for h in allowed)}

    def allowed(self, value: bytes) -> bool:
        host = value.decode("latin-1").strip().lower()
        if host.startswith("["):  # [::1]:8000
            name = host[1:host.find("]")] if "]" in host else ""
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        name = name.rstrip(".")
        if not name:
            return False
        if name in self.names or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host")
        if host is not None and not self.allowed(host):
            error = APIError(400, "Host header not allowed: this server has no API key, so it answers only requests "
                                  "addressed to localhost, an IP address or a name given with --allowed-hosts "
                                  "(start it with --allowed-hosts NAME, or with --api-key).", code="invalid_host",
                             headers={"Connection": "close"} if _has_body(headers) else None)
            return await error.response(scope.get("path", ""))(scope, receive, send)
        await self.app(scope, receive, send)


class ApiKey:
    """API key check (constant-time) on everything but /health, the console's files and, unless
    --no-metrics-public, /metrics: 'Authorization: Bearer KEY' (OpenAI's clients; the scheme in any
    case, RFC 7235) or 'x-api-key: KEY' (Anthropic's). It runs before the body is read: a refused
    request's body is never buffered, and its connection is closed rather than drained."""

    def __init__(self, app: ASGIApp, api_key: str, metrics_public: bool = True) -> None:
        self.app, self.key = app, api_key.encode()
        self.public = _PUBLIC_PATHS + (("/metrics",) if metrics_public else ())

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        bearer_ok = hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"
        key_ok = hmac.compare_digest(headers.get(b"x-api-key", b"").strip(), self.key)
        return bearer_ok or key_ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope["method"]
        headers = dict(scope.get("headers") or [])
        # Public: GETs of the public paths and CORS preflights, each without a body: nothing lets
        # an unauthenticated client make the server read one.
        public = not _has_body(headers) and (
            (method in ("GET", "HEAD") and (path in self.public or path.startswith(_PUBLIC_PREFIXES)))
            or method == "OPTIONS")
        if not public and not self.authorized(headers):
            extra = {"WWW-Authenticate": "Bearer"}
            if _has_body(headers):  # stop reading it: closing costs the client a reconnect, not us a body
                extra["Connection"] = "close"
            error = APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
                             "authentication_error", None, "invalid_api_key", extra)
            return await error.response(path)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over the limit, announced by Content-Length or counted as a chunked body
    arrives; 408 for a body that has not all arrived `timeout` seconds after the headers (a client
    trickling it would hold its connection and buffer forever). Either closes the connection.
    The body is read here, before the app runs, and replayed to it: an error raised from inside
    the app's `receive` would be caught by FastAPI's body parsing and answered 400. A body is at
    most the limit (a few MiB), so holding it is cheap; a longer one is never read past the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: Optional[float] = None) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        close = {"Connection": "close"}
        too_large = APIError(413, f"Request body exceeds {self.max_bytes} bytes", code="request_too_large",
                             headers=close)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large.response(path)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        chunks: list[bytes] = []
        seen = 0
        while True:
            try:
                message = await (receive() if deadline is None else
                                 asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0)))
            except asyncio.TimeoutError:
                error = APIError(408, f"The request body did not arrive within {self.timeout:g} s "
                                      "(--body-timeout)", code="request_timeout", headers=close)
                return await error.response(path)(scope, receive, send)
            if message["type"] != "http.request":  # http.disconnect: the client left mid-body
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await too_large.response(path)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            # The whole body once, then the server's own receive: the app must still see
            # http.disconnect (until_disconnect and streaming responses watch for it).
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
