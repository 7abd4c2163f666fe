"""Wire types -> engine types, in one place: a request's SamplingParams, and the engine's errors
back to OpenAI's error shape with the request's own field names."""

from __future__ import annotations

from typing import Union

import json

from ..engine import SamplingParams
from ..engine.errors import InvalidRequestError
from ..engine.grammar import StructuredOutput
from . import protocol as p
from .errors import APIError, bad_request, from_exception

SamplingRequest = Union[p.ChatCompletionRequest, p.CompletionRequest]


def sampling_params(body: SamplingRequest) -> SamplingParams:
    """The engine's SamplingParams for a request (one per call: every prompt of a batch shares them)."""
    if isinstance(body, p.ChatCompletionRequest):
        max_tokens = body.requested_max_tokens()
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        max_tokens, logprobs = body.max_tokens, body.logprobs
    try:
        return SamplingParams(
            n=body.n,
            max_tokens=max_tokens,  # None: what the context leaves (the engine knows how much)
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),  # -1 means off, as in vLLM
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=None if body.seed is None else body.seed % 2**63,
            stop=body.stop_list(),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            logit_bias=tuple((int(k), v) for k, v in (body.logit_bias or {}).items()),
            min_tokens=body.min_tokens,
            structured=structured_output(body),
        )
    except InvalidRequestError as exc:
        raise api_error(exc, body) from None


def structured_output(body: SamplingRequest) -> StructuredOutput | None:
    """The constraint on the output: response_format, vLLM's structured_outputs, or a forced tool
    call; with a reasoning parser, on the answer only (the thinking before it is left free)."""
    spec = _constraint(body)
    reasoning = getattr(body, "_reasoning", None)
    if spec is None or reasoning is None:
        return spec
    try:
        return reasoning.wrap(spec)
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"invalid {spec.field}: {exc}", spec.field) from None


def _constraint(body: SamplingRequest) -> StructuredOutput | None:
    if isinstance(body, p.ChatCompletionRequest) and body._tool_grammar is not None:
        return StructuredOutput("lark", body._tool_grammar, "tools")
    fmt, so = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type == "json_schema":
        return StructuredOutput.json_schema(fmt.json_schema.schema_, "response_format")
    if fmt is not None and fmt.type == "json_object":
        return StructuredOutput.json_schema({"type": "object"}, "response_format")
    if so is None:
        return None
    if so.json_ is not None:
        schema = so.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(f"structured_outputs.json is not JSON: {exc}", "structured_outputs") from None
        return StructuredOutput.json_schema(schema, "structured_outputs")
    if so.json_object:
        return StructuredOutput.json_schema({"type": "object"}, "structured_outputs")
    if so.regex is not None:
        return StructuredOutput("regex", so.regex, "structured_outputs")
    if so.choice is not None:
        return StructuredOutput("choice", json.dumps(so.choice), "structured_outputs")
    return StructuredOutput("grammar", so.grammar, "structured_outputs")


def wire_field(field: str | None, body: object) -> str | None:
    """The request's name for an engine field (the engine says prompt, max_tokens, logprobs)."""
    if isinstance(body, p.ChatCompletionRequest):
        if field == "prompt":
            return "messages"
        if field == "max_tokens" and body.max_completion_tokens is not None:
            return "max_completion_tokens"
        if field == "logprobs":
            return "top_logprobs"
    return field


def api_error(exc: BaseException, body: object = None, request_id: str | None = None) -> APIError:
    """The OpenAI-shaped error for what the engine raised, with the request's field names."""
    if isinstance(exc, InvalidRequestError):
        if exc.code == "model_not_found":  # a LoRA adapter unloaded between lookup and submit
            return APIError(404, str(exc), "invalid_request_error", "model", "model_not_found")
        return bad_request(str(exc), wire_field(exc.field, body), exc.code)
    return from_exception(exc, request_id)
