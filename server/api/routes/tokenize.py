"""POST /tokenize and /detokenize, in vLLM's shapes (lm-eval and others use them)."""

from __future__ import annotations

from fastapi import APIRouter

from .. import protocol as p
from .. import protocol_vllm as pv
from ..errors import bad_request
from .common import Services, to_thread


def router(services: Services) -> APIRouter:
    api = APIRouter()
    registry = services.registry

    @api.post("/tokenize")
    async def tokenize(body: pv.TokenizeRequest) -> pv.TokenizeResponse:
        served, _ = await registry.resolve(body.model, body.keep_alive)
        if body.messages is not None:
            messages = p.ChatCompletionRequest(model=served.name, messages=body.messages).chat_messages()
            tokens = await to_thread(served.render_chat, messages, body.add_generation_prompt)
        else:
            tokens = await to_thread(served.encode, body.prompt, body.add_special_tokens)
        return pv.TokenizeResponse(count=len(tokens), max_model_len=served.max_model_len, tokens=tokens)

    @api.post("/detokenize")
    async def detokenize(body: pv.DetokenizeRequest) -> pv.DetokenizeResponse:
        served, _ = await registry.resolve(body.model, body.keep_alive)
        # The one check of ids that never reach the engine.
        vocab = served.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise bad_request(f"token ids must be below the vocabulary size {vocab}", "tokens")
        return pv.DetokenizeResponse(prompt=await to_thread(served.decode, body.tokens))

    return api
