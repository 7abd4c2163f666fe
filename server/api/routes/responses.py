"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API, served by the
same chat path (convert.chat_from_responses makes the chat request, responses.py shapes the
output). Stored responses (store: true, the default) live in an in-process store bounded by
--max-stored-responses and --max-stored-response-bytes, oldest evicted first."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError

from .. import protocol as p
from .. import protocol_responses as pr
from .. import responses
from ..convert import chat_from_responses
from ..errors import APIError
from ..tools import prepare_chat
from .common import Services, submit, to_thread, until_disconnect
from .openai import SSE_HEADERS

_ITEMS = TypeAdapter(list[pr.InputItem])


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", "invalid_request_error", param, "not_found")


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry
    settings = services.settings
    store = responses.ResponseStore(settings.max_stored_responses, settings.max_stored_response_bytes)

    @api.post("/v1/responses", response_model=None)
    async def create_response(body: pr.ResponsesRequest, request: Request):
        served, lora = await registry.resolve(body.model, body.keep_alive)
        history: list = []
        if body.previous_response_id is not None:
            stored = store.get(body.previous_response_id)
            if stored is None:
                raise _not_found(body.previous_response_id, "previous_response_id")
            history = stored.conversation
        try:
            items = _ITEMS.validate_python(history)
        except ValidationError:  # pragma: no cover - the store holds what was validated once
            raise _not_found(body.previous_response_id or "", "previous_response_id") from None
        chat = chat_from_responses(body, items)
        prompt, reader = await to_thread(prepare_chat, served, chat, settings.tool_call_parser,
                                         settings.reasoning_parser)
        gen = await submit(services, served, chat, p.random_id("resp").replace("-", "_"), [prompt], lora, request)
        ctx = responses.ResponseContext(body, history, store,
                                        lambda text: len(served.encode(text, add_special_tokens=False)))
        if body.stream:
            return StreamingResponse(responses.response_stream(gen, reader, ctx), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return JSONResponse(await until_disconnect(request, gen, chat, responses.response_whole(gen, reader, ctx)))

    @api.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> JSONResponse:
        stored = store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return JSONResponse(stored.response)

    @api.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> pr.DeletedResponse:
        if not store.delete(response_id):
            raise _not_found(response_id)
        return pr.DeletedResponse(id=response_id)

    return api
