"""GET /health, GET /metrics, GET /v1/memory: what operators and orchestrators read."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ...cpu_threads import cpu_report
from ..errors import unavailable
from ..memory import device_memory, host_memory, model_memory
from .common import Services


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry

    @api.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        serving, reason = registry.health()
        if serving:
            cpu = cpu_report()
            for model in registry.models():  # the thread-count controller (engine/cpu_load.py), if one runs
                follower = getattr(model.engine, "cpu_load_report", lambda: None)()
                cpu.update(follower or {"follows_load": False})
            execution = {m.name: m.engine.execution() for m in registry.models() if hasattr(m.engine, "execution")}
            return JSONResponse({"status": "ok", "models": [m.name for m in registry.models()],
                                 "states": {e.name: e.state for e in registry.entries()}, "cpu": cpu,
                                 "execution": execution})
        if registry.state == "loading":
            elapsed = int(time.time() - registry.started_at)
            return unavailable(f"The model is loading ({elapsed} s so far).", retry_after=5).response()
        return unavailable(f"Not serving: {reason}").response()

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/memory")
    async def memory() -> JSONResponse:
        models = [model_memory(m) for m in registry.models()]
        budget = {"budget_bytes": registry.budget_bytes, "used_bytes": registry.used_bytes(),
                  "models_max": registry.max_loaded}
        return JSONResponse({"host": host_memory(), "devices": device_memory(), "models": models, "registry": budget})

    return api
