"""Engine outputs -> OpenAI responses: SSE chunks ending in `data: [DONE]`, or one JSON body.

The engine already detokenizes incrementally and strips stop strings, so each CompletionOutput
carries the new text of one choice. Here we only shape it: chat.completion(.chunk) or
text_completion, logprobs in each API's format, true usage counts, timings for the metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator, Callable, Optional

from pydantic import BaseModel

from . import protocol as p
from .errors import from_exception
from .output import PLAIN, Event, OutputParser, OutputReader, ParsedOutput, parse_whole
from .reasoning import ReasoningDelta
from .tool_parsers import ContentDelta


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json(exclude_unset=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclasses.dataclass
class RequestTiming:
    """What the metrics need about one request, measured where the tokens reach the client."""

    arrival: float = dataclasses.field(default_factory=time.monotonic)
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    inter_token: list[float] = dataclasses.field(default_factory=list)
    queue_time: Optional[float] = None  # reported by the engine with the first output
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = dataclasses.field(default_factory=list)

    def tokens_arrived(self, count: int) -> None:
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None and count:
            self.inter_token.extend([(now - self.last_token) / count] * count)
        self.last_token = now
        self.completion_tokens += count


@dataclasses.dataclass
class Generation:
    """One request to the engine: its (possibly several) output streams and how to describe them."""

    request_id: str
    model: str
    streams: list[AsyncIterator[Any]]  # one per prompt; choice index = prompt * n + engine index
    n: int
    token_text: Callable[[int], str]
    on_finish: Callable[[RequestTiming], None]
    abort: Callable[[], None]
    include_usage: bool = False
    continuous_usage: bool = False  # every chunk carries the usage so far (vLLM's continuous_usage_stats)
    timing: RequestTiming = dataclasses.field(default_factory=RequestTiming)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    async def outputs(self) -> AsyncIterator[tuple[int, Any, Any]]:
        """(prompt index, RequestOutput, CompletionOutput) in arrival order across prompts."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                for triple in from_prompt(0, out):
                    yield triple
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, stream: AsyncIterator[Any]) -> None:
            try:
                async for out in stream:
                    await queue.put((i, out))
            except BaseException as exc:  # surfaced to the consumer below
                await queue.put((i, exc))
            finally:
                await queue.put((i, done))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    for triple in from_prompt(i, item):
                        yield triple
        finally:
            for t in tasks:
                t.cancel()


def from_prompt(i: int, out: Any) -> list[tuple[int, Any, Any]]:
    return [(i, out, c) for c in out.outputs]


# ------------------------------------------------------------------ logprobs formatting


def _chat_logprobs(gen: Generation, logprobs: Optional[list[Any]]) -> Optional[p.ChoiceLogprobs]:
    if logprobs is None:
        return None
    content = []
    for lp in logprobs:
        text = gen.token_text(lp.token_id)
        top = [
            p.TopLogprob(token=(t := gen.token_text(tid)), logprob=_finite(v), bytes=list(t.encode("utf-8")))
            for tid, v in lp.top
        ]
        content.append(
            p.ChatTokenLogprob(token=text, logprob=_finite(lp.logprob), bytes=list(text.encode("utf-8")), top_logprobs=top)
        )
    return p.ChoiceLogprobs(content=content)


def _completion_logprobs(gen: Generation, logprobs: Optional[list[Any]], offset: int) -> Optional[p.CompletionLogprobs]:
    if logprobs is None:
        return None
    out = p.CompletionLogprobs()
    for lp in logprobs:
        text = gen.token_text(lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_finite(lp.logprob))
        out.top_logprobs.append({gen.token_text(tid): _finite(v) for tid, v in lp.top} if lp.top else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number. -9999.0 is what OpenAI itself sends.
    return x if x > -9999.0 else -9999.0


def _usage(gen: Generation, num_prompt_tokens: int, cached: int) -> p.UsageInfo:
    return p.UsageInfo(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=gen.timing.completion_tokens,
        total_tokens=num_prompt_tokens + gen.timing.completion_tokens,
        prompt_tokens_details={"cached_tokens": cached},
    )


def _finish(reason: Optional[str], called: bool = False) -> Optional[str]:
    # "abort" only reaches a client that is already gone; anything else unknown reads as "stop".
    # A choice that ended by itself after tool calls ends with "tool_calls"; cut short, "length".
    if reason is None:
        return None
    if reason == "length":
        return "length"
    return "tool_calls" if called else "stop"


class _PromptCounts:
    """Prompt token counts per prompt (usage sums them; cached tokens too)."""

    def __init__(self) -> None:
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}

    def see(self, i: int, out: Any) -> None:
        self.prompt[i] = out.num_prompt_tokens
        self.cached[i] = out.num_cached_tokens

    def totals(self) -> tuple[int, int]:
        return sum(self.prompt.values()), sum(self.cached.values())


async def _guarded(gen: Generation) -> AsyncIterator[tuple[int, Any, Any]]:
    """The outputs, with the abort-on-exit and metrics bookkeeping every response path needs."""
    finished = False
    try:
        async for triple in gen.outputs():
            if gen.timing.queue_time is None:
                gen.timing.queue_time = triple[1].queue_time
            yield triple
        finished = True
    finally:
        if not finished:
            gen.abort()
        gen.on_finish(gen.timing)


@dataclasses.dataclass
class _Collected:
    """Everything a non-streamed response needs, gathered from the outputs by choice index."""

    texts: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    token_ids: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    logprobs: dict[int, list] = dataclasses.field(default_factory=dict)
    finish: dict[int, Optional[str]] = dataclasses.field(default_factory=dict)
    counts: _PromptCounts = dataclasses.field(default_factory=_PromptCounts)

    def text(self, index: int) -> str:
        return "".join(self.texts.get(index, []))


async def collect(gen: Generation) -> _Collected:
    """Every choice's whole output (a non-streamed response)."""
    got = _Collected()
    async for i, out, c in _guarded(gen):
        got.counts.see(i, out)
        index = i * gen.n + c.index
        gen.timing.tokens_arrived(len(c.token_ids))
        got.texts.setdefault(index, []).append(c.text)
        got.token_ids.setdefault(index, []).extend(c.token_ids)
        if c.logprobs is not None:
            got.logprobs.setdefault(index, []).extend(c.logprobs)
        if c.finish_reason is not None:
            gen.timing.finish_reasons.append(c.finish_reason)
            got.finish[index] = c.finish_reason
    return got


# ------------------------------------------------------------------ news per choice, read


@dataclasses.dataclass
class ChoiceNews:
    """One engine output of one choice, read: its events, raw logprobs, and (at its end) the
    engine's finish reason and whether the choice made tool calls."""

    index: int
    events: list[Event]
    logprobs: Optional[list[Any]]
    finish_reason: Optional[str]
    called: bool
    text: str  # the raw text, as the engine sent it
    token_ids: list[int]


async def choice_events(gen: Generation, reader: OutputReader, counts: "_PromptCounts") -> AsyncIterator[ChoiceNews]:
    """The streamed outputs of every choice through its own OutputParser (one per choice)."""
    parsers: dict[int, OutputParser] = {}
    async for i, out, c in _guarded(gen):
        counts.see(i, out)
        index = i * gen.n + c.index
        gen.timing.tokens_arrived(len(c.token_ids))
        parser = parsers.get(index) or parsers.setdefault(index, reader.parser())
        events = parser.feed(c.text) + (parser.finish() if c.finish_reason is not None else [])
        if c.finish_reason is not None:
            gen.timing.finish_reasons.append(c.finish_reason)
        yield ChoiceNews(index, events, c.logprobs, c.finish_reason, parser.has_calls, c.text, c.token_ids)


def usage_so_far(gen: Generation, counts: "_PromptCounts") -> p.UsageInfo:
    return _usage(gen, *counts.totals())


# ------------------------------------------------------------------ chat


def _delta(event: Event) -> p.ChatDelta:
    if isinstance(event, ContentDelta):
        return p.ChatDelta(content=event.text)
    if isinstance(event, ReasoningDelta):
        return p.ChatDelta(reasoning_content=event.text)
    return p.ChatDelta(tool_calls=[p.ToolCallDelta(
        index=event.index, id=event.id, type="function" if event.id is not None else None,
        function=p.FunctionCallDelta(name=event.name, arguments=event.arguments))])


async def chat_stream(gen: Generation, reader: OutputReader = PLAIN) -> AsyncIterator[str]:
    """reader: how each choice's text is read (thinking, content, tool calls; output.py)."""
    chunk_id, counts = gen.request_id, _PromptCounts()

    def chunk(choices: list[p.ChatChunkChoice]) -> str:
        usage = usage_so_far(gen, counts) if gen.continuous_usage else None
        return sse(p.ChatCompletionChunk(id=chunk_id, created=gen.created, model=gen.model, choices=choices,
                                         usage=usage))

    try:
        for index in range(gen.n * len(gen.streams)):  # the role once, first (as OpenAI sends it)
            yield chunk([p.ChatChunkChoice(index=index, delta=p.ChatDelta(role="assistant", content=""))])
        async for news in choice_events(gen, reader, counts):
            logprobs = _chat_logprobs(gen, news.logprobs)
            events = news.events
            if logprobs is not None and not events:
                events = [ContentDelta("")]  # the logprobs still go out with this step
            for event in events:
                yield chunk([p.ChatChunkChoice(index=news.index, delta=_delta(event), logprobs=logprobs)])
                logprobs = None
            if news.finish_reason is not None:
                yield chunk([p.ChatChunkChoice(index=news.index, delta=p.ChatDelta(),
                                               finish_reason=_finish(news.finish_reason, news.called))])
        if gen.include_usage:
            yield sse(p.ChatCompletionChunk(id=chunk_id, created=gen.created, model=gen.model, choices=[],
                                            usage=usage_so_far(gen, counts)))
    except Exception as exc:  # headers are sent: report in-band, as OpenAI-compatible servers do
        yield sse(_stream_error(gen, exc))
    yield SSE_DONE


def read_whole(reader: OutputReader, text: str, finish: Optional[str]) -> ParsedOutput:
    """A whole choice, read; cut short ("length"), a call whose arguments did not close is left out."""
    parsed = parse_whole(reader, text)
    if finish == "length":
        parsed.calls = [c for c in parsed.calls if _is_json(c["arguments"])]
    return parsed


def _message(parsed: ParsedOutput) -> p.ChatResponseMessage:
    reasoning = parsed.reasoning or None
    if not parsed.calls:
        return p.ChatResponseMessage(content=parsed.content, reasoning_content=reasoning)
    return p.ChatResponseMessage(content=parsed.content or None, reasoning_content=reasoning, tool_calls=[
        p.ToolCall(id=c["id"], function=p.FunctionCall(name=c["name"], arguments=c["arguments"]))
        for c in parsed.calls])


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def chat_response(gen: Generation, reader: OutputReader = PLAIN) -> p.ChatCompletion:
    got = await collect(gen)
    choices = []
    for index in range(gen.n * len(gen.streams)):
        message = _message(read_whole(reader, got.text(index), got.finish.get(index)))
        choices.append(p.ChatChoice(
            index=index,
            message=message,
            logprobs=_chat_logprobs(gen, got.logprobs.get(index)) if index in got.logprobs else None,
            finish_reason=_finish(got.finish.get(index), bool(message.tool_calls)),
        ))
    return p.ChatCompletion(id=gen.request_id, created=gen.created, model=gen.model, choices=choices,
                            usage=_usage(gen, *got.counts.totals()))


# ------------------------------------------------------------------ completions


async def completion_stream(gen: Generation) -> AsyncIterator[str]:
    counts, offsets = _PromptCounts(), {}

    def chunk(choice: p.CompletionChoice) -> str:
        usage = usage_so_far(gen, counts) if gen.continuous_usage else None
        return sse(p.Completion(id=gen.request_id, created=gen.created, model=gen.model, choices=[choice], usage=usage))

    try:
        async for i, out, c in _guarded(gen):
            counts.see(i, out)
            index = i * gen.n + c.index
            gen.timing.tokens_arrived(len(c.token_ids))
            if c.finish_reason is not None:
                gen.timing.finish_reasons.append(c.finish_reason)
            if c.text or c.logprobs or c.finish_reason is not None:
                yield chunk(p.CompletionChoice(
                    index=index, text=c.text,
                    logprobs=_completion_logprobs(gen, c.logprobs, offsets.get(index, 0)),
                    finish_reason=_finish(c.finish_reason),
                ))
                offsets[index] = offsets.get(index, 0) + len(c.text)
        if gen.include_usage:
            prompt_tokens, cached = counts.totals()
            yield sse(p.Completion(id=gen.request_id, created=gen.created, model=gen.model, choices=[],
                                   usage=_usage(gen, prompt_tokens, cached)))
    except Exception as exc:
        yield sse(_stream_error(gen, exc))
    yield SSE_DONE


async def completion_response(gen: Generation, echo_texts: Optional[list[str]] = None) -> p.Completion:
    got = await collect(gen)
    choices = []
    for index in range(gen.n * len(gen.streams)):
        prefix = echo_texts[index // gen.n] if echo_texts else ""
        choices.append(p.CompletionChoice(
            index=index,
            text=prefix + got.text(index),
            logprobs=_completion_logprobs(gen, got.logprobs.get(index), len(prefix)) if index in got.logprobs else None,
            finish_reason=_finish(got.finish.get(index)),
        ))
    return p.Completion(id=gen.request_id, created=gen.created, model=gen.model, choices=choices,
                        usage=_usage(gen, *got.counts.totals()))


def stream_error(gen: Generation, exc: Exception) -> Any:
    """The APIError a failure mid-stream is reported as (each API words it in its own shape)."""
    return from_exception(exc, gen.request_id)


def _stream_error(gen: Generation, exc: Exception) -> dict:
    # The headers are sent: the error goes in-band, as OpenAI-compatible servers do. Its text is
    # generic for our failures (from_exception logs the cause with the request id).
    return from_exception(exc, gen.request_id).body()
