"""create_app(settings, registry): the FastAPI app. Routes are thin; this file wires the
lifespan (background model load, graceful shutdown), the error shape, and the guards that run
before any route (guards.py): the Host check, the API key, the body's size and time, CORS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..config import Settings
from .errors import install_error_handlers
from .guards import ApiKey, BodyLimit, HostCheck
from .metrics import Metrics
from .model_entry import ModelLeases
from .registry import Registry
from .replica import ReplicaHeader, default_replica_id
from .routes import console, embeddings, lora, messages, models, openai, ops, quantization, responses, tokenize
from .routes.common import Services

logger = logging.getLogger("quantserve.server")


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
    for routes in (quantization, models, openai, messages, responses, embeddings, tokenize, ops, console, lora):  # quantization's path before /v1/models/{id}
        app.include_router(routes.router(services))
    # Innermost: a request's model leases end once its response is sent in full (registry.py).
    app.add_middleware(ModelLeases, registry=registry)
    # Added last = outermost: the Host check runs first, then the key check (before any of the
    # body is read), then the body's size and time limits, then CORS.
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    if settings.api_key is not None:
        app.add_middleware(ApiKey, api_key=settings.api_key.get_secret_value(), metrics_public=settings.metrics_public)
    else:
        app.add_middleware(HostCheck, allowed=settings.allowed_hosts, bind_host=settings.host)
    # Outermost: the guards' own answers (401, 413, 421) carry it too.
    app.add_middleware(ReplicaHeader, replica_id=default_replica_id())
    return app
