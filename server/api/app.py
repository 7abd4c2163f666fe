"""create_app(settings, registry): the FastAPI app. Routes are thin; this file wires the
lifespan (background model load, graceful shutdown), the error shape, and three guards that run
before any route: request size, API key, CORS."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from .errors import APIError, install_error_handlers
from .metrics import Metrics
from .registry import Registry
from .routes import console, embeddings, lora, messages, openai, ops, quantization, responses, tokenize
from .routes.common import Services

logger = logging.getLogger("quantserve.server")

_PUBLIC_PATHS = ("/health", "/metrics", "/")  # "/": the console's page, which asks for the key itself
_PUBLIC_PREFIXES = ("/console/",)  # the console's static files


class _BodyLimit:
    """413 for bodies over the limit, announced by Content-Length or counted as a chunked body
    arrives. The body is read here, before the app runs, and replayed to it: an error raised from
    inside the app's `receive` would be caught by FastAPI's body parsing and answered 400. A
    body is at most the limit (a few MiB), so holding it is cheap; a longer one is never read
    past the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"Request body exceeds {self.max_bytes} bytes", code="request_too_large")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large.response(scope.get("path", ""))(scope, receive, send)
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client left mid-body
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await too_large.response(scope.get("path", ""))(scope, receive, send)
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


class _ApiKey:
    """API key check (constant-time) on everything but /health, /metrics and the console's files:
    'Authorization: Bearer KEY' (OpenAI's clients) or 'x-api-key: KEY' (Anthropic's)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.bearer, self.key = app, f"Bearer {api_key}".encode(), api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES) \
                or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        bearer_ok = hmac.compare_digest(headers.get(b"authorization", b""), self.bearer)
        key_ok = hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)
        if not (bearer_ok or key_ok):
            error = APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
                             "authentication_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return await error.response(path)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(settings: Settings, registry: Registry) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: the port opens now and /health answers "loading" until ready.
        # A failed load (or, later, a dead engine) is serve.Watchdog's to turn into an exit.
        loading = asyncio.create_task(registry.start())
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await registry.shutdown()

    app = FastAPI(title="quantserve", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    services = Services(settings=settings, registry=registry, metrics=Metrics(registry))
    for routes in (quantization, openai, messages, responses, embeddings, tokenize, ops, console, lora):  # quantization's path before /v1/models/{id}
        app.include_router(routes.router(services))
    # Added last = outermost: the size guard runs first, then the key check, then CORS.
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    if settings.api_key is not None:
        app.add_middleware(_ApiKey, api_key=settings.api_key.get_secret_value())
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    return app
