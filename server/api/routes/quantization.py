"""GET /v1/models/{id}/quantization: what quantizing cost, layer by layer, as measured at load.

Registered before /v1/models/{id} (whose path parameter would otherwise take "x/quantization").
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .common import Services


def quantization_report(served: Any) -> dict[str, Any]:
    """{"object": "quantization_report", "model", "summary", "layers"} of a served model."""
    stats = list(getattr(served.load_report, "layer_stats", None) or [])
    return {
        "object": "quantization_report",
        "model": served.name,
        "summary": quantization_summary(served),
        "layers": [s.as_dict() for s in stats],
    }


def quantization_summary(served: Any) -> Any:
    """The report's summary alone (what GET /v1/models/{id} shows), None without a load report."""
    report = getattr(served, "load_report", None)
    summarize = getattr(report, "quantization_summary", None)
    return summarize() if callable(summarize) else None


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry

    @api.get("/v1/models/{model_id:path}/quantization")
    async def model_quantization(model_id: str) -> dict[str, Any]:
        served = registry.get(model_id)  # 404 model_not_found in OpenAI's shape; 503 while loading
        return quantization_report(served)

    return api
