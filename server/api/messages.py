"""Engine outputs -> Anthropic Messages responses: one Message, or the event stream
message_start, ping, (content_block_start, content_block_delta..., content_block_stop) per block,
message_delta, message_stop. The output is read by the reader every API shares (output.py):
thinking -> a thinking block, content -> a text block, each tool call -> a tool_use block.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable, Optional

from . import protocol_messages as pm
from .output import OutputReader
from .reasoning import ReasoningDelta
from .streaming import Generation, _PromptCounts, choice_events, collect, read_whole, stream_error
from .tool_parsers import ContentDelta


def _event(kind: str, payload: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n"


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict[str, Any]:
    value = json.loads(arguments or "{}")
    return value if isinstance(value, dict) else {"value": value}


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> pm.Usage:
    return pm.Usage(input_tokens=prompt_tokens - cached, cache_read_input_tokens=cached, output_tokens=output_tokens)


class StopReader:
    """Why a choice ended, in Anthropic's words. The engine strips a stop string and says "stop"
    for it and for an end-of-sequence token alike: the stop string is found in the tail of the
    choice's tokens decoded whole, past the text that was sent."""

    def __init__(self, stops: Optional[list[str]], decode: Callable[[list[int]], str]) -> None:
        self.stops, self.decode = stops or [], decode

    def __call__(self, finish: Optional[str], called: bool, text: str, token_ids: list[int]) -> tuple[str, Optional[str]]:
        if finish == "length":
            return "max_tokens", None
        if called:
            return "tool_use", None
        if self.stops and token_ids:
            full = self.decode(token_ids)
            tail = full[max(0, len(text) - 2):]
            found = [(tail.find(s), s) for s in self.stops if s in tail]
            if found:
                return "stop_sequence", min(found)[1]
        return "end_turn", None


async def message_response(gen: Generation, reader: OutputReader, stop: StopReader) -> pm.Message:
    got = await collect(gen)
    finish = got.finish.get(0)
    parsed = read_whole(reader, got.text(0), finish)
    content: list[pm.ContentBlock] = []
    if parsed.reasoning:
        content.append(pm.ThinkingBlock(thinking=parsed.reasoning))
    if parsed.content:
        content.append(pm.TextBlock(text=parsed.content))
    content += [pm.ToolUseBlock(id=tool_use_id(c["id"]), name=c["name"], input=_input(c["arguments"]))
                for c in parsed.calls]
    reason, sequence = stop(finish, bool(parsed.calls), got.text(0), got.token_ids.get(0, []))
    prompt_tokens, cached = got.counts.totals()
    return pm.Message(id=gen.request_id, model=gen.model, content=content, stop_reason=reason, stop_sequence=sequence,
                      usage=_usage(prompt_tokens, cached, gen.timing.completion_tokens))


async def message_stream(gen: Generation, reader: OutputReader, stop: StopReader) -> AsyncIterator[str]:
    """The event stream; message_start goes out with the first output (its usage needs the
    prompt's cached tokens, known once the prompt is scheduled)."""
    counts = _PromptCounts()
    started = False
    block: Optional[tuple[str, int]] = None  # the open block: (kind, call index or -1)
    index = -1
    text: list[str] = []
    token_ids: list[int] = []

    def start_message() -> list[str]:
        prompt_tokens, cached = counts.totals()
        message = pm.Message(id=gen.request_id, model=gen.model, content=[],
                             usage=_usage(prompt_tokens, cached, gen.timing.completion_tokens))
        return [_event("message_start", {"message": message.model_dump()}), _event("ping", {})]

    def close() -> list[str]:
        nonlocal block
        if block is None:
            return []
        block = None
        return [_event("content_block_stop", {"index": index})]

    def open_block(kind: str, call: int, content_block: dict) -> list[str]:
        nonlocal block, index
        out = close()
        index += 1
        block = (kind, call)
        return out + [_event("content_block_start", {"index": index, "content_block": content_block})]

    def delta(payload: dict) -> str:
        return _event("content_block_delta", {"index": index, "delta": payload})

    try:
        async for news in choice_events(gen, reader, counts):
            out: list[str] = []
            text.append(news.text)
            token_ids.extend(news.token_ids)
            if not started:
                started = True
                out += start_message()
            for event in news.events:
                if isinstance(event, ReasoningDelta):
                    if block is None or block[0] != "thinking":
                        out += open_block("thinking", -1, {"type": "thinking", "thinking": "", "signature": ""})
                    out.append(delta({"type": "thinking_delta", "thinking": event.text}))
                elif isinstance(event, ContentDelta):
                    if block is None or block[0] != "text":
                        out += open_block("text", -1, {"type": "text", "text": ""})
                    out.append(delta({"type": "text_delta", "text": event.text}))
                else:
                    if event.id is not None:
                        out += open_block("tool_use", event.index, {"type": "tool_use", "id": tool_use_id(event.id),
                                                                    "name": event.name, "input": {}})
                    if event.arguments:
                        out.append(delta({"type": "input_json_delta", "partial_json": event.arguments}))
            if out:
                yield "".join(out)
            if news.finish_reason is not None:
                closing = close()
                if closing:
                    yield "".join(closing)
                reason, sequence = stop(news.finish_reason, news.called, "".join(text), token_ids)
                prompt_tokens, cached = counts.totals()
                usage = _usage(prompt_tokens, cached, gen.timing.completion_tokens)
                yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                               "usage": usage.model_dump()})
                yield _event("message_stop", {})
        return
    except Exception as exc:  # the headers are sent: the error goes in-band, in Anthropic's shape
        yield f"event: error\ndata: {json.dumps(stream_error(gen, exc).anthropic_body())}\n\n"
