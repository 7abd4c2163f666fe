"""Helpers the OpenAI routes share: model lookup, token budgets, engine submission."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from fastapi import Request

from ..errors import APIError, bad_request, overloaded
from ..registry import Registry, ServedModel
from ..streaming import Generation

logger = logging.getLogger("quantserve.server")


def registry(request: Request) -> Registry:
    return request.app.state.registry


def log_unknown_fields(body: Any) -> None:
    unknown = body.unknown_fields()
    if unknown:
        logger.debug("ignoring unknown request fields: %s", ", ".join(unknown))


def resolve_max_tokens(
    requested: Optional[int], prompt_len: int, max_model_len: int, param: str, prompt_param: str
) -> int:
    """The completion budget: what was asked, or the rest of the context. Never truncates a prompt."""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens. Shorten the prompt.",
            prompt_param,
            "context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            f"Reduce the prompt or {param}.",
            param,
            "context_length_exceeded",
        )
    return requested


def check_n(request: Request, n: int) -> None:
    limit = request.app.state.settings.max_n
    if n > limit:
        raise bad_request(f"n must be at most {limit}", "n", "invalid_value")


async def to_thread(fn: Any, *args: Any) -> Any:
    # Tokenizing a long prompt takes milliseconds to seconds: keep it off the event loop.
    return await asyncio.to_thread(fn, *args)


def submit(
    request: Request, served: ServedModel, request_id: str, prompts: list[list[int]], params: list[Any],
    n: int, include_usage: bool,
) -> Generation:
    """Submit one engine request per prompt; return the Generation the response is built from."""
    from ...engine import EngineOverloadedError

    engine = served.engine
    ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
    streams = []
    try:
        for rid, prompt, sp in zip(ids, prompts, params):
            streams.append(engine.generate(prompt, sp, rid))
    except EngineOverloadedError as exc:
        for rid in ids[: len(streams)]:
            engine.abort(rid)
        raise overloaded(getattr(exc, "retry_after", 1.0)) from None
    except ValueError as exc:
        for rid in ids[: len(streams)]:
            engine.abort(rid)
        raise APIError(400, str(exc), code="invalid_value") from None
    metrics = request.app.state.metrics

    def abort() -> None:
        for rid in ids:
            engine.abort(rid)

    tokenizer = served.tokenizer
    return Generation(
        request_id=request_id,
        model=served.name,
        streams=streams,
        n=n,
        token_text=lambda t: tokenizer.decode([t]),
        on_finish=lambda timing: metrics.request_finished(served.name, timing),
        abort=abort,
        include_usage=include_usage,
    )
