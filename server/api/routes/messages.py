"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API (Claude Code, the
Anthropic SDK), served by the same chat path: convert.chat_from_messages makes the chat request,
messages.py shapes the output. Errors come in Anthropic's shape on these paths (errors.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import messages
from .. import protocol as p
from .. import protocol_messages as pm
from ..convert import chat_from_messages
from ..tools import prepare_chat
from .common import Services, submit, to_thread, until_disconnect
from .openai import SSE_HEADERS


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry
    settings = services.settings

    @api.post("/v1/messages", response_model=None)
    async def create_message(body: pm.MessagesRequest, request: Request):
        served, lora = await registry.resolve(body.model, body.keep_alive)
        chat = chat_from_messages(body)
        prompt, reader = await to_thread(prepare_chat, served, chat, settings.tool_call_parser,
                                         settings.reasoning_parser)
        gen = await submit(services, served, chat, p.random_id("msg").replace("-", "_"), [prompt], lora, request)
        stop = messages.StopReader(body.stop_sequences, lambda ids: served.decode(ids, skip_special_tokens=True))
        if body.stream:
            return StreamingResponse(messages.message_stream(gen, reader, stop), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await until_disconnect(request, gen, chat, messages.message_response(gen, reader, stop))

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(body: pm.CountTokensRequest) -> pm.CountTokensResponse:
        served, _ = await registry.resolve(body.model, body.keep_alive)
        chat = chat_from_messages(body)
        prompt, _ = await to_thread(prepare_chat, served, chat, settings.tool_call_parser, None)
        return pm.CountTokensResponse(input_tokens=len(prompt))

    return api
