"""POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter: LoRA adapters loaded and unloaded
while serving, with vLLM's request shapes, plain-text success answers and status codes (400 for
a bad or duplicate adapter, 404 for a missing folder or an unknown name).

Off unless the server was started with --enable-lora-runtime-load (vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING): a load reads files the client names. When on, only folders
inside --lora-root are read (symlinks resolved first), each file size-capped before it is read,
at most --max-cpu-loras adapters held; every way of not finding an adapter gets the same answer,
which names no path, so that the endpoint tells nothing about the server's other folders."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ...engine.lora import MAX_PATH_CHARS, AdapterError, AdapterNotFoundError
from .. import protocol_vllm as pv
from ..errors import APIError, bad_request
from .common import Services, to_thread

MAX_NAME_CHARS = 256


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry, settings = services.registry, services.settings
    enabled = settings.enable_lora_runtime_load

    def check_enabled() -> None:
        if not enabled:
            raise APIError(404, "Loading LoRA adapters at runtime is off: the server was started without "
                                "--enable-lora-runtime-load.", code="not_found")

    @api.post("/v1/load_lora_adapter", response_class=PlainTextResponse, include_in_schema=enabled)
    async def load_lora_adapter(body: pv.LoadLoRAAdapterRequest) -> PlainTextResponse:
        check_enabled()
        name = body.lora_name.strip()
        if not name or not body.lora_path.strip():
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided.", "lora_name")
        if len(name) > MAX_NAME_CHARS:
            raise bad_request(f"lora_name is longer than {MAX_NAME_CHARS} characters.", "lora_name")
        if len(body.lora_path) > MAX_PATH_CHARS:
            raise bad_request(f"lora_path is longer than {MAX_PATH_CHARS} characters.", "lora_path")
        served = registry.get(None)
        if any(e.name == name for e in registry.entries()):
            raise bad_request(f"The lora adapter '{name}' cannot take the base model's name.", "lora_name")
        try:  # reading and checking the weights takes a while: off the event loop
            await to_thread(served.engine.loras.load, name, body.lora_path, (), settings.lora_root,
                            settings.lora_capacity())
        except AdapterNotFoundError:
            raise APIError(404, f"LoRA adapter '{name}': lora_path is not an adapter folder inside the server's "
                                "LoRA root (a peft folder with adapter_config.json and adapter_model.safetensors)",
                           "invalid_request_error", "lora_path", "not_found") from None
        except AdapterError as exc:  # the adapter's own problem, said without paths or values
            raise bad_request(str(exc), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @api.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, include_in_schema=enabled)
    async def unload_lora_adapter(body: pv.UnloadLoRAAdapterRequest) -> PlainTextResponse:
        check_enabled()
        served = registry.get(None)
        try:
            served.engine.loras.unload(body.lora_name)
        except KeyError:
            raise APIError(404, f"The lora adapter '{body.lora_name[:MAX_NAME_CHARS]}' cannot be found.",
                           "invalid_request_error", "lora_name", "not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return api
