"""POST /tokenize and /detokenize, in vLLM's shapes (lm-eval and others use them)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .. import protocol as p
from ..errors import bad_request
from .common import log_unknown_fields, registry, to_thread

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: p.TokenizeRequest, request: Request) -> p.TokenizeResponse:
    log_unknown_fields(body)
    served = registry(request).get(body.model)
    if body.messages is not None:
        messages = p.ChatCompletionRequest(model=served.name, messages=body.messages).chat_messages()
        tokens = await to_thread(served.render_chat, messages)
    else:
        tokens = await to_thread(served.encode, body.prompt, body.add_special_tokens)
    return p.TokenizeResponse(count=len(tokens), max_model_len=served.max_model_len, tokens=tokens)


@router.post("/detokenize")
async def detokenize(body: p.DetokenizeRequest, request: Request) -> p.DetokenizeResponse:
    log_unknown_fields(body)
    served = registry(request).get(body.model)
    vocab = len(served.tokenizer)
    if any(t >= vocab for t in body.tokens):
        raise bad_request(f"token ids must be below the vocabulary size {vocab}", "tokens")
    return p.DetokenizeResponse(prompt=served.tokenizer.decode(body.tokens))
