"""The models the server knows and their control: GET /v1/models[/{id}] (OpenAI's listing, with
each model's state and memory cost), GET /models (llama-server's router listing), POST
/models/load and /models/unload (llama-server's and Ollama's verbs; behind --api-key)."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter
from pydantic import Field

from .. import protocol as p
from ..errors import model_not_found
from ..protocol import _Strict
from ..model_entry import ModelEntry
from .common import Services


class ModelControl(_Strict):
    model: str = Field(min_length=1)


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry

    @api.api_route("/v1/models", methods=["GET", "HEAD"])
    async def list_models() -> p.ModelList:
        registry.check_serving()  # a one-model server: 503 while loading or failed
        return p.ModelList(data=[c for e in registry.entries() for c in [entry_card(e), *lora_cards(e)]])

    @api.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def retrieve_model(model_id: str) -> p.ModelCard:
        registry.check_serving()
        for entry in registry.entries():
            for found in (entry_card(entry), *lora_cards(entry)):
                if found.id == model_id:
                    return found
        raise model_not_found(model_id)

    @api.get("/models")
    async def router_models() -> dict[str, Any]:
        """llama-server's router shape: {"data": [{"id", "object", "owned_by", "created", "path",
        "status": {"value": loaded|loading|unloaded, "failed"?, ...}}]}."""
        return {"object": "list", "data": [router_card(e) for e in registry.entries()]}

    @api.post("/models/load")
    async def load(body: ModelControl) -> dict[str, Any]:
        entry = await registry.load(body.model)
        return {"success": True, "model": router_card(entry)}

    @api.post("/models/unload")
    async def unload(body: ModelControl) -> dict[str, Any]:
        entry = await registry.unload(body.model)
        return {"success": True, "model": router_card(entry)}

    return api


def entry_card(entry: ModelEntry) -> p.ModelCard:
    from .quantization import quantization_summary

    served = entry.served
    keep = entry.keep_alive if entry.keep_alive is not None else entry.spec.keep_alive
    return p.ModelCard(
        id=entry.name, created=served.created if served is not None else entry.spec_created, root=entry.name,
        max_model_len=served.max_model_len if served is not None else None,
        quantization=quantization_summary(served) if served is not None else None,
        state=entry.state, error=entry.error, memory=memory(entry),
        keep_alive=None if keep is None or keep < 0 else keep, load_seconds=entry.load_seconds)


def memory(entry: ModelEntry) -> Optional[dict[str, Any]]:
    """A loaded model's weights and KV cache as held (measured), else what loading it would take
    (the estimate; None until one was made); `estimated` says which."""
    served, cost = entry.served, entry.cost
    if served is not None:
        weights = served.engine.weight_memory()["total"]
        kv = served.engine.stats().kv_cache_bytes
        return {"weight_bytes": weights, "kv_cache_bytes": kv, "estimated": False,
                "total_bytes": cost.total_bytes if cost is not None else weights + kv}
    if cost is None:
        return None
    return {"weight_bytes": cost.weight_bytes, "kv_cache_bytes": cost.kv_cache_bytes,
            "total_bytes": cost.total_bytes, "estimated": True}


def lora_cards(entry: ModelEntry) -> list[p.ModelCard]:
    """A loaded model's LoRA adapters: parent = the base, root = the adapter's name (vLLM puts its
    path there; a public listing shows no server path)."""
    served = entry.served
    if served is None:
        return []
    return [p.ModelCard(id=a.name, created=a.created, root=a.name, parent=served.name,
                        max_model_len=served.max_model_len, state=entry.state)
            for a in served.engine.loras.list()]


def router_card(entry: ModelEntry) -> dict[str, Any]:
    status: dict[str, Any] = {"value": {"loaded": "loaded", "loading": "loading"}.get(entry.state, "unloaded")}
    if entry.state == "error":
        status.update(failed=True, error=entry.error)
    card: dict[str, Any] = {"id": entry.name, "object": "model", "owned_by": "quantserve",
                            "created": entry.spec_created, "path": entry.spec.settings.model, "status": status}
    found = memory(entry)
    if found is not None:
        card["memory"] = found
    return card


