"""How a request's output is read, for every API: the thinking split off first (reasoning.py),
then the answer split into content and tool calls (tool_parsers.py). Chat completions, the
Responses API and the Messages API all read choices with this one parser and only shape the
events differently, streamed or whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from .reasoning import Reasoning, ReasoningDelta, ReasoningSplitter
from .tool_parsers import CallDelta, ContentDelta, ToolCallParser, collect_events

Event = Union[ContentDelta, CallDelta, ReasoningDelta]


@dataclasses.dataclass(frozen=True)
class OutputReader:
    """What a request's output may hold: tool calls (tools: a tools.ToolContext), thinking, and
    whether more than one call is allowed (parallel_tool_calls: false keeps the first only)."""

    tools: Any = None
    reasoning: Optional[Reasoning] = None
    parallel_tool_calls: bool = True

    def parser(self) -> "OutputParser":
        return OutputParser(None if self.reasoning is None else self.reasoning.splitter(),
                            None if self.tools is None else self.tools.parser(), self.parallel_tool_calls)


PLAIN = OutputReader()


class OutputParser:
    """One choice's text -> events, incrementally (see the module docstring)."""

    def __init__(self, splitter: Optional[ReasoningSplitter], tools: Optional[ToolCallParser],
                 parallel_tool_calls: bool = True) -> None:
        self.splitter, self.tools, self.parallel = splitter, tools, parallel_tool_calls

    @property
    def has_calls(self) -> bool:
        return self.tools is not None and self.tools.has_calls

    def feed(self, text: str) -> list[Event]:
        events = self.splitter.feed(text) if self.splitter is not None else [ContentDelta(text)]
        return self._answer(events)

    def finish(self) -> list[Event]:
        events = self._answer(self.splitter.finish()) if self.splitter is not None else []
        if self.tools is not None:
            events += self._only_allowed(self.tools.finish())
        return events

    def _answer(self, events: list[Event]) -> list[Event]:
        if self.tools is None:
            return [e for e in events if e.text]
        out: list[Event] = []
        for event in events:
            if isinstance(event, ContentDelta):
                out += self._only_allowed(self.tools.feed(event.text))
            elif event.text:
                out.append(event)
        return out

    def _only_allowed(self, events: list[Event]) -> list[Event]:
        # parallel_tool_calls: false means at most one call, whatever the model writes after it.
        return [e for e in events if self.parallel or not isinstance(e, CallDelta) or e.index == 0]


@dataclasses.dataclass
class ParsedOutput:
    """A whole choice, read: its thinking, its content, its tool calls ({"id", "name", "arguments"})."""

    reasoning: str
    content: str
    calls: list[dict[str, str]]


def parse_whole(reader: OutputReader, text: str) -> ParsedOutput:
    """A whole output through the streaming parser: streamed and whole responses always agree."""
    parser = reader.parser()
    return collect(parser.feed(text) + parser.finish())


def collect(events: list[Event]) -> ParsedOutput:
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content, calls = collect_events([e for e in events if not isinstance(e, ReasoningDelta)])
    return ParsedOutput(reasoning, content, calls)
