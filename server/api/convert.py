"""Wire types -> engine types, in one place: a request's SamplingParams, and the engine's errors
back to OpenAI's error shape with the request's own field names."""

from __future__ import annotations

import json
from typing import Union

from pydantic import ValidationError

from ..engine import SamplingParams
from ..engine.errors import InvalidRequestError
from ..engine.grammar import StructuredOutput
from . import protocol as p
from . import protocol_messages as pm
from . import protocol_responses as pr
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
        return StructuredOutput.json_schema(fmt.json_schema.schema_, "response_format", bool(fmt.json_schema.strict))
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


# ---------------------------------------------------------------- other APIs -> the chat request


def chat_request(fields: dict) -> p.ChatCompletionRequest:
    """The chat request another API's request became; a value the chat request refuses is a 400
    in the calling API's shape (its handler picks the shape)."""
    try:
        return p.ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise bad_request(f"{where}: {first.get('msg', 'invalid')}".removeprefix(": ").replace("Value error, ", ""),
                          where or None, "invalid_value") from None


def chat_from_messages(body: pm._Prompt) -> p.ChatCompletionRequest:
    """An Anthropic Messages request as the chat request: the system prompt first, tool_use blocks
    as the assistant's tool calls, tool_result blocks as tool messages (in their order), thinking
    blocks dropped (templates drop earlier turns' thinking too)."""
    messages: list[dict] = []
    system = body.system_text()
    if system:
        messages.append({"role": "system", "content": system})
    for m in body.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        if m.role == "assistant":
            text = "".join(b.text for b in m.content if b.type == "text")
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in m.content if b.type == "tool_use"]
            messages.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
            continue
        text: list[str] = []
        for block in m.content:
            if block.type == "text":
                text.append(block.text)
            elif block.type == "tool_result":
                if text:
                    messages.append({"role": "user", "content": "".join(text)})
                    text = []
                content = block.text()
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                 "content": f"Error: {content}" if block.is_error else content})
        if text or not m.content:
            messages.append({"role": "user", "content": "".join(text)})
    fields: dict = {"model": body.model, "messages": messages}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}), "parameters": t.input_schema}}
            for t in body.tools]
    choice = body.tool_choice
    if choice is not None:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
            {"type": "function", "function": {"name": choice.name}}
        fields["parallel_tool_calls"] = not getattr(choice, "disable_parallel_tool_use", False)
    if body.thinking is not None:
        fields["chat_template_kwargs"] = {"enable_thinking": body.thinking.type != "disabled"}
    if isinstance(body, pm.MessagesRequest):
        fmt = body.output_config.format if body.output_config is not None else None
        if fmt is not None:
            fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
        fields.update(max_tokens=body.max_tokens, stop=body.stop_sequences, stream=body.stream,
                      temperature=body.temperature, top_p=body.top_p if body.top_p is not None else 1.0,
                      top_k=body.top_k or 0)
    return chat_request(fields)


def chat_from_responses(body: pr.ResponsesRequest, history: list) -> p.ChatCompletionRequest:
    """A Responses request as the chat request. `history`: the input items and output items of
    the previous_response_id chain (already validated items). Instructions are not inherited
    from earlier responses (OpenAI's rule); reasoning items are not shown to the model."""
    messages: list[dict] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    for item in [*history, *body.items()]:
        if isinstance(item, pr.MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, pr.FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same turn: text, then its calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, pr.FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    fields: dict = {"model": body.model, "messages": messages, "max_tokens": body.max_output_tokens,
                    "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream,
                    "parallel_tool_calls": body.parallel_tool_calls}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}),
            **({"parameters": t.parameters} if t.parameters is not None else {})}} for t in body.tools]
    if isinstance(body.tool_choice, pr.FunctionToolChoice):
        fields["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        fields["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(by_alias=True, exclude={"type"},
                                                                                         exclude_none=True)}
    elif fmt is not None and fmt.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    if body.reasoning is not None and body.reasoning.effort in ("none", "minimal"):
        fields["chat_template_kwargs"] = {"enable_thinking": False}
    return chat_request(fields)
