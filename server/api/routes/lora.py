"""POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter: LoRA adapters loaded and unloaded
while serving, with vLLM's request shapes, plain-text success answers and status codes (400 for
a bad or duplicate adapter, 404 for a missing folder or an unknown name). Guarded by the API key
like every /v1 route (app.py)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ...engine.lora import AdapterError, AdapterNotFoundError
from .. import protocol_vllm as pv
from ..errors import APIError, bad_request
from .common import Services, to_thread


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry

    @api.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: pv.LoadLoRAAdapterRequest) -> PlainTextResponse:
        served = registry.get(None)
        name = body.lora_name.strip()
        if not name or not body.lora_path.strip():
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided.", "lora_name")
        if any(m.name == name for m in registry.models()):
            raise bad_request(f"The lora adapter '{name}' cannot take the base model's name.", "lora_name")
        try:  # reading and checking the weights takes a while: off the event loop
            await to_thread(served.engine.loras.load, name, body.lora_path)
        except AdapterNotFoundError as exc:
            raise APIError(404, str(exc), "invalid_request_error", "lora_path", "not_found") from None
        except AdapterError as exc:
            raise bad_request(str(exc), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @api.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: pv.UnloadLoRAAdapterRequest) -> PlainTextResponse:
        served = registry.get(None)
        try:
            served.engine.loras.unload(body.lora_name)
        except KeyError:
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "invalid_request_error",
                           "lora_name", "not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return api
