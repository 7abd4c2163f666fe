"""Engine outputs -> OpenAI Responses API objects, and the in-process store behind `store` and
`previous_response_id`.

The output is read by the reader every API shares (output.py): thinking -> a reasoning item,
content -> a message item, each tool call -> a function_call item, in the order the model wrote
them. Streamed, each item is announced (response.output_item.added), filled by its deltas
(output_text / reasoning_text / function_call_arguments .delta) and closed (.done events, then
response.output_item.done); response.created and response.in_progress come first,
response.completed (or response.incomplete when max_output_tokens cut it) last; every event
carries a sequence_number.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from . import protocol_responses as pr
from .output import Event, OutputReader, ParsedOutput
from .reasoning import ReasoningDelta
from .streaming import Generation, _PromptCounts, choice_events, collect, read_whole, stream_error
from .tool_parsers import CallDelta, ContentDelta

logger = logging.getLogger("quantserve.server")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------ the store


@dataclasses.dataclass
class Stored:
    response: dict[str, Any]  # as it was sent
    conversation: list[dict[str, Any]]  # every input item of the chain, then this response's output items
    size: int


class ResponseStore:
    """Stored responses by id, bounded in count and in bytes (their JSON, conversation included).
    When either bound is passed the least recently stored or used response is evicted first;
    a response larger than the whole byte budget is not stored (and says so in the log)."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()
        self._bytes = 0
        self.evicted = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> bool:
        size = len(json.dumps(response)) + len(json.dumps(conversation))
        if self.max_count == 0 or size > self.max_bytes:
            logger.info("response %s not stored: %d bytes, the store holds %d", response["id"], size, self.max_bytes)
            return False
        with self._lock:
            self._items[response["id"]] = Stored(response, conversation, size)
            self._bytes += size
            while len(self._items) > self.max_count or self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.size
                self.evicted += 1
        return True

    def get(self, response_id: str) -> Optional[Stored]:
        with self._lock:
            found = self._items.get(response_id)
            if found is not None:
                self._items.move_to_end(response_id)
            return found

    def delete(self, response_id: str) -> bool:
        with self._lock:
            found = self._items.pop(response_id, None)
            if found is not None:
                self._bytes -= found.size
            return found is not None


# ------------------------------------------------------------------ items


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if text else [], "status": status}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: Optional[str], status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [_text_part(text)]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def output_items(parsed: ParsedOutput, cut: bool) -> list[dict[str, Any]]:
    items = []
    if parsed.reasoning:
        items.append(_reasoning_item(_id("rs"), parsed.reasoning))
    if parsed.content or not parsed.calls:
        items.append(_message_item(_id("msg"), parsed.content, "incomplete" if cut else "completed"))
    items += [_call_item(_id("fc"), c["id"], c["name"], c["arguments"]) for c in parsed.calls]
    return items


@dataclasses.dataclass
class ResponseContext:
    """What a response echoes from its request and how it is finished (usage, store)."""

    body: pr.ResponsesRequest
    history: list[dict[str, Any]]  # the previous responses' conversation
    store: Optional[ResponseStore]
    count_tokens: Callable[[str], int]  # for usage.output_tokens_details.reasoning_tokens

    def response(self, gen: Generation, status: str, output: list[dict[str, Any]],
                 usage: Optional[pr.ResponseUsage] = None) -> pr.Response:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {"type": "text"}
        choice = b.tool_choice.model_dump() if isinstance(b.tool_choice, pr.FunctionToolChoice) else (
            b.tool_choice or ("auto" if b.tools else "none"))
        return pr.Response(
            id=gen.request_id, created_at=gen.created, status=status, model=gen.model, output=output,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=b.instructions, max_output_tokens=b.max_output_tokens,
            parallel_tool_calls=b.parallel_tool_calls, previous_response_id=b.previous_response_id, store=b.store,
            temperature=b.temperature, top_p=b.top_p, text={"format": fmt}, tool_choice=choice,
            tools=[t.model_dump(exclude_none=True) for t in b.tools or ()], usage=usage,
            metadata=b.metadata or {}, user=b.user,
            reasoning={"effort": b.reasoning.effort if b.reasoning else None, "summary": None},
        )

    def usage(self, gen: Generation, counts: _PromptCounts, reasoning: str) -> pr.ResponseUsage:
        prompt_tokens, cached = counts.totals()
        output = gen.timing.completion_tokens
        thinking = min(output, self.count_tokens(reasoning)) if reasoning else 0
        return pr.ResponseUsage(input_tokens=prompt_tokens, input_tokens_details={"cached_tokens": cached},
                                output_tokens=output, output_tokens_details={"reasoning_tokens": thinking},
                                total_tokens=prompt_tokens + output)

    def finish(self, response: pr.Response) -> dict[str, Any]:
        sent = response.model_dump()
        if self.body.store and self.store is not None:
            inputs = [item.model_dump(exclude_none=True) for item in self.body.items()]
            self.store.put(sent, [*self.history, *inputs, *sent["output"]])
        return sent


async def response_whole(gen: Generation, reader: OutputReader, ctx: ResponseContext) -> dict[str, Any]:
    got = await collect(gen)
    finish = got.finish.get(0)
    parsed = read_whole(reader, got.text(0), finish)
    status = "incomplete" if finish == "length" else "completed"
    response = ctx.response(gen, status, output_items(parsed, finish == "length"),
                            ctx.usage(gen, got.counts, parsed.reasoning))
    return ctx.finish(response)


class _Items:
    """The stream's output items as they open, grow and close, as events."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.open: Optional[dict[str, Any]] = None
        self.text: list[str] = []  # the open item's text (reasoning, message) or arguments
        self.reasoning: list[str] = []
        self.call_index = -1

    @property
    def index(self) -> int:
        return len(self.items) - 1

    def add(self, item: dict[str, Any]) -> list[tuple[str, dict]]:
        out = self.close()
        self.items.append(item)
        self.open, self.text = item, []
        out.append(("response.output_item.added", {"output_index": self.index, "item": dict(item)}))
        if item["type"] == "message":
            out.append(("response.content_part.added", {"item_id": item["id"], "output_index": self.index,
                                                         "content_index": 0, "part": _text_part("")}))
        return out

    def event(self, event: Event) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        where: dict[str, Any] = {}
        if isinstance(event, ReasoningDelta):
            if self.open is None or self.open["type"] != "reasoning":
                out += self.add(_reasoning_item(_id("rs"), "", "in_progress"))
            self.reasoning.append(event.text)
            kind, where = "response.reasoning_text.delta", {"content_index": 0}
        elif isinstance(event, ContentDelta):
            if self.open is None or self.open["type"] != "message":
                out += self.add(_message_item(_id("msg"), None, "in_progress"))
            kind, where = "response.output_text.delta", {"content_index": 0, "logprobs": []}
        else:
            if event.id is not None:
                self.call_index = event.index
                out += self.add(_call_item(_id("fc"), event.id, event.name or "", "", "in_progress"))
            if not event.arguments:
                return out
            kind = "response.function_call_arguments.delta"
        self.text.append(event.arguments if isinstance(event, CallDelta) else event.text)
        out.append((kind, {"item_id": self.open["id"], "output_index": self.index, **where,
                           "delta": self.text[-1]}))
        return out

    def close(self, status: str = "completed") -> list[tuple[str, dict]]:
        item, self.open = self.open, None
        if item is None:
            return []
        text, at = "".join(self.text), {"item_id": item["id"], "output_index": self.index}
        out: list[tuple[str, dict]] = []
        if item["type"] == "reasoning":
            item.update(_reasoning_item(item["id"], text))
            out.append(("response.reasoning_text.done", {**at, "content_index": 0, "text": text}))
        elif item["type"] == "message":
            item.update(_message_item(item["id"], text, status))
            out.append(("response.output_text.done", {**at, "content_index": 0, "text": text, "logprobs": []}))
            out.append(("response.content_part.done", {**at, "content_index": 0, "part": _text_part(text)}))
        else:
            item.update(arguments=text, status="completed")
            out.append(("response.function_call_arguments.done", {**at, "name": item["name"], "arguments": text}))
        out.append(("response.output_item.done", {"output_index": self.index, "item": dict(item)}))
        return out


async def response_stream(gen: Generation, reader: OutputReader, ctx: ResponseContext) -> AsyncIterator[str]:
    sequence = 0

    def sse(kind: str, payload: dict) -> str:
        nonlocal sequence
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': sequence - 1, **payload})}\n\n"

    started = ctx.response(gen, "in_progress", []).model_dump()
    yield sse("response.created", {"response": started})
    yield sse("response.in_progress", {"response": started})
    counts, items = _PromptCounts(), _Items()
    try:
        async for news in choice_events(gen, reader, counts):
            out = [sse(kind, payload) for event in news.events for kind, payload in items.event(event)]
            if news.finish_reason is not None:
                cut = news.finish_reason == "length"
                out += [sse(k, v) for k, v in items.close("incomplete" if cut else "completed")]
                if not items.items:  # an empty answer is still a message
                    out += [sse(k, v) for k, v in items.add(_message_item(_id("msg"), None, "in_progress"))]
                    out += [sse(k, v) for k, v in items.close("incomplete" if cut else "completed")]
                status = "incomplete" if cut else "completed"
                response = ctx.response(gen, status, items.items, ctx.usage(gen, counts, "".join(items.reasoning)))
                out.append(sse(f"response.{status}", {"response": ctx.finish(response)}))
            if out:
                yield "".join(out)
    except Exception as exc:  # headers are sent: the failure is the stream's last event
        error = stream_error(gen, exc)
        failed = ctx.response(gen, "failed", items.items).model_dump()
        failed["error"] = {"code": error.code or error.type, "message": error.message}
        yield sse("response.failed", {"response": failed})
