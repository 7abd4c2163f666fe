"""POST /v1/chat/completions, POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import protocol as p
from .. import streaming
from ..errors import bad_request
from ..tools import prepare_chat
from .common import Services, submit, to_thread, until_disconnect

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry

    @api.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(body: p.ChatCompletionRequest, request: Request):
        served, lora = await registry.resolve(body.model, body.keep_alive)
        settings = services.settings
        prompt, reader = await to_thread(prepare_chat, served, body, settings.tool_call_parser,
                                         settings.reasoning_parser)
        gen = await submit(services, served, body, p.random_id("chatcmpl"), [prompt], lora, request)
        if body.stream:
            return StreamingResponse(streaming.chat_stream(gen, reader), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await until_disconnect(request, gen, body, streaming.chat_response(gen, reader))

    @api.post("/v1/completions", response_model=None)
    async def create_completion(body: p.CompletionRequest, request: Request):
        served, lora = await registry.resolve(body.model, body.keep_alive)
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs is not supported", "echo")
        prompts = [await to_thread(served.encode, raw) if isinstance(raw, str) else list(raw) for raw in body.prompts()]
        gen = await submit(services, served, body, p.random_id("cmpl"), prompts, lora, request)
        if body.stream:
            return StreamingResponse(streaming.completion_stream(gen), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        # Echoed prompts are decoded after the engine accepted the ids (it checks them against the vocabulary).
        echo = [raw if isinstance(raw, str) else await to_thread(served.decode, raw) for raw in body.prompts()] \
            if body.echo else None
        return await until_disconnect(request, gen, body, streaming.completion_response(gen, echo))

    return api
