"""What the routes share: the services they are given (no app.state lookups), submission to the
engine, and awaiting a non-streamed response."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any, Awaitable, Optional

from fastapi import Request

from ...config import Settings
from .. import protocol as p
from ..convert import SamplingRequest, api_error, sampling_params
from ..errors import APIError
from ..metrics import Metrics
from ..registry import Registry, ServedModel
from ..streaming import Generation


@dataclasses.dataclass(frozen=True)
class Services:
    """Everything a handler may use, handed to each router's factory by create_app."""

    settings: Settings
    registry: Registry
    metrics: Metrics


async def submit(services: Services, served: ServedModel, body: SamplingRequest, request_id: str,
           prompts: list[list[int]], lora: Optional[str] = None, http: Optional[Request] = None) -> Generation:
    """Submit the call's prompts to the engine (all or none), on LoRA adapter `lora` if named, as
    the client `http` came from; the Generation the response is built from."""
    params = sampling_params(body)
    grammars = getattr(served.engine, "grammars", None)
    if params.structured is not None and grammars is not None:
        try:  # compiled on the engine's grammar threads, within its time budget: never on the loop
            await grammars.prepare(params.structured)
        except Exception as exc:
            raise api_error(exc, body, request_id) from None
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    client = client_name(http, services.settings) if http is not None else ""
    try:
        streams = served.engine.generate_many(prompts, [params] * len(prompts), ids, lora=lora, client=client,
                                              priority=getattr(body, "priority", 0))
    except Exception as exc:  # the engine's verdict on this request: 400, 429 or 503
        raise api_error(exc, body, request_id) from None

    def abort() -> None:
        for rid in ids:
            served.engine.abort(rid)

    return Generation(
        request_id=request_id,
        model=lora or served.name,
        streams=streams,
        n=body.n,
        token_text=served.token_text,
        on_finish=lambda timing: services.metrics.request_finished(served.name, timing),
        abort=abort,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        continuous_usage=bool(body.stream_options and body.stream_options.include_usage
                              and body.stream_options.continuous_usage_stats),
    )


def client_name(request: Request, settings: Settings) -> str:
    """Who sent a request, for fair scheduling: its address, and where the server checks API keys
    the key's hash too (a checked key cannot be forged; one key shared by everyone alone would
    make everyone one client)."""
    address = request.client.host if request.client is not None else ""
    if settings.api_key is None:
        return address  # unchecked keys would let a client pose as many
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    return f"{hashlib.sha256(key.encode()).hexdigest()[:16]}@{address}"


async def until_disconnect(request: Request, gen: Generation, body: SamplingRequest, work: Awaitable[Any]) -> Any:
    """Await a non-streamed response, aborting the generation if the client goes away meanwhile;
    an engine failure becomes its OpenAI error (503 when the engine died, 500 otherwise)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                try:
                    return task.result()
                except Exception as exc:
                    raise api_error(exc, body, gen.request_id) from None
            if await request.is_disconnected():
                gen.abort()
                task.cancel()
                raise APIError(499, "client closed the request", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()


async def to_thread(fn: Any, *args: Any) -> Any:
    # Tokenizing a long prompt takes milliseconds to seconds: keep it off the event loop.
    return await asyncio.to_thread(fn, *args)

