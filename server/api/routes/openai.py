"""POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}]."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import protocol as p
from .. import streaming
from ..errors import bad_request
from .common import check_n, log_unknown_fields, registry, resolve_max_tokens, submit, to_thread

router = APIRouter()

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: p.ChatCompletionRequest, request: Request):
    log_unknown_fields(body)
    served = registry(request).get(body.model)
    check_n(request, body.n)
    prompt = await to_thread(served.render_chat, body.chat_messages())
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(
        body.requested_max_tokens(), len(prompt), served.max_model_len, param, "messages"
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    gen = submit(request, served, p.random_id("chatcmpl"), [prompt], [body.to_sampling_params(max_tokens)],
                 body.n, include_usage)
    if body.stream:
        return StreamingResponse(streaming.chat_stream(gen), media_type="text/event-stream", headers=_SSE_HEADERS)
    return await request.app.state.until_disconnect(request, streaming.chat_response(gen), gen.abort)


@router.post("/v1/completions", response_model=None)
async def create_completion(body: p.CompletionRequest, request: Request):
    log_unknown_fields(body)
    served = registry(request).get(body.model)
    check_n(request, body.n)
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs is not supported", "echo")
    vocab = len(served.tokenizer)
    prompts, texts = [], []
    for raw in body.prompts():
        if isinstance(raw, str):
            prompts.append(await to_thread(served.encode, raw))
            texts.append(raw)
        else:
            if any(t >= vocab for t in raw):
                raise bad_request(f"token ids must be below the vocabulary size {vocab}", "prompt")
            prompts.append(list(raw))
            texts.append(served.tokenizer.decode(raw) if body.echo else "")
    if len(prompts) * body.n > request.app.state.settings.max_n:
        raise bad_request(f"prompts x n must be at most {request.app.state.settings.max_n}", "prompt")
    params = [body.to_sampling_params(resolve_max_tokens(
        body.max_tokens, len(ids), served.max_model_len, "max_tokens", "prompt"))
              for ids in prompts]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    gen = submit(request, served, p.random_id("cmpl"), prompts, params, body.n, include_usage)
    if body.stream:
        return StreamingResponse(streaming.completion_stream(gen), media_type="text/event-stream", headers=_SSE_HEADERS)
    return await request.app.state.until_disconnect(
        request, streaming.completion_response(gen, texts if body.echo else None), gen.abort
    )


def _card(served) -> p.ModelCard:
    return p.ModelCard(id=served.name, created=served.created, root=served.name, max_model_len=served.max_model_len)


@router.get("/v1/models")
async def list_models(request: Request) -> p.ModelList:
    reg = registry(request)
    if reg.state != "ready":
        reg.get(None)  # raises the loading / failed error
    return p.ModelList(data=[_card(m) for m in reg.models()])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> p.ModelCard:
    return _card(registry(request).get(model_id))
