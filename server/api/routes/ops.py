"""GET /health, GET /metrics, GET /v1/memory: what operators and orchestrators read."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import unavailable
from ..memory import device_memory, host_memory, model_memory
from .common import registry

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    reg = registry(request)
    serving, reason = reg.health()
    if serving:
        return JSONResponse({"status": "ok", "models": [m.name for m in reg.models()]})
    if reg.state == "loading":
        elapsed = int(time.time() - reg.started_at)
        return unavailable(f"The model is loading ({elapsed} s so far).", retry_after=5).response()
    return unavailable(f"Not serving: {reason}").response()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/memory")
async def memory(request: Request) -> JSONResponse:
    reg = registry(request)
    models = [model_memory(m) for m in reg.models()] if reg.state == "ready" else []
    return JSONResponse({"host": host_memory(), "devices": device_memory(), "models": models})
