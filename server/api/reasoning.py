"""Reasoning parsers (--reasoning-parser, vLLM's names): a model's thinking, written between
<think> and </think>, is split off from its answer: `reasoning_content` in chat completions,
reasoning items in the Responses API, thinking blocks in the Messages API. One incremental
splitter serves streamed and whole responses, so both always agree.

Where the thinking starts is read from the prompt, not guessed from the model's name:
  - the rendered prompt ends with <think> (R1 distills' and Qwen3's templates open the
    assistant's turn with it): the output begins inside the thinking;
  - it ends with </think> (Qwen3 with enable_thinking: false writes an empty thinking): the output
    is the answer, unless it opens a thinking of its own;
  - otherwise deepseek_r1 reads the output as thinking until </think> (R1 writes no opening tag;
    an output without </think> is all thinking, as vLLM reads it), qwen3 only after a leading <think>.

A structured output or a tool call constrains only the answer: `wrap` puts a free thinking before
the request's grammar (llguidance's grammar references: the answer is the request's own grammar,
unchanged).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from ..engine.grammar import StructuredOutput
from .tool_parsers import ContentDelta, _partial_marker

PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


@dataclasses.dataclass
class ReasoningDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class Reasoning:
    """How one request's output is read: which parser, and whether it begins inside the thinking."""

    parser: str
    starts_inside: bool
    special: tuple[tuple[str, int], ...] = ()  # markers that are special tokens of the model: (text, id)

    def splitter(self) -> "ReasoningSplitter":
        return ReasoningSplitter(self.starts_inside)

    def wrap(self, answer: StructuredOutput) -> StructuredOutput:
        """The constraint `answer` preceded by a free thinking that ends at </think>."""
        inner = answer.to_grammar()
        grammars = json.loads(inner)["grammars"] if inner.lstrip().startswith("{") else [{"lark_grammar": inner}]
        grammars[0] = {**grammars[0], "name": "qs_answer"}
        special = dict(self.special)

        def literal(text: str) -> str:
            return f"<[{special[text]}]>" if text in special else json.dumps(text)

        thinking = "qs_think" if self.starts_inside else f"({literal(START)} qs_think)?"
        lark = ("%llguidance {}\n"
                f"start: {thinking} @qs_answer\n"
                "qs_think: qs_text QS_WS\n"
                f"qs_text[lazy]: QS_TEXT {literal(END)}\n"
                "QS_TEXT: /(.|\\n)*/\n"
                "QS_WS: /[ \\t\\r\\n]*/\n")
        return StructuredOutput("llguidance", json.dumps({"grammars": [{"lark_grammar": lark}, *grammars]}),
                                answer.field)


def reasoning_for(parser: Optional[str], prompt_tail: str, special: dict[str, int]) -> Optional[Reasoning]:
    """The Reasoning of a request whose rendered prompt ends with `prompt_tail` (None: no parser)."""
    if parser is None:
        return None
    if parser not in PARSERS:
        raise ValueError(f"unknown reasoning parser {parser!r} (known: {', '.join(PARSERS)})")
    tail = prompt_tail.rstrip()
    if tail.endswith(START):
        inside = True
    elif tail.endswith(END):
        inside = False
    else:
        inside = parser == "deepseek_r1"
    found = tuple((m, special[m]) for m in (START, END) if m in special)
    return Reasoning(parser, inside, found)


class ReasoningSplitter:
    """Splits one choice's text into ReasoningDelta and ContentDelta events as it arrives. Text
    that may be the beginning of a marker is held back until it is known; the whitespace between
    </think> and the answer belongs to neither."""

    def __init__(self, starts_inside: bool) -> None:
        self.state = "thinking" if starts_inside else "start"
        self.pending = ""

    @property
    def in_thinking(self) -> bool:
        return self.state == "thinking"

    def feed(self, text: str) -> list:
        events: list = []
        buf, self.pending = self.pending + text, ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(START):
                    self.state, buf = "thinking", stripped[len(START):]
                elif START.startswith(stripped):  # empty or a prefix of <think>: wait for more
                    self.pending = buf
                    return events
                else:
                    self.state = "answer"
            elif self.state == "thinking":
                at = buf.find(END)
                if at >= 0:
                    if at:
                        events.append(ReasoningDelta(buf[:at]))
                    self.state, buf = "after", buf[at + len(END):]
                    continue
                keep = _partial_marker(buf, (END,))
                if len(buf) > keep:
                    events.append(ReasoningDelta(buf[: len(buf) - keep]))
                self.pending = buf[len(buf) - keep:]
                return events
            elif self.state == "after":
                buf = buf.lstrip()
                if buf:
                    self.state = "answer"
            else:
                events.append(ContentDelta(buf))
                return events
        return events

    def finish(self) -> list:
        """The end of the output: held text is what it was going to be."""
        text, self.pending = self.pending, ""
        if not text:
            return []
        return [ReasoningDelta(text)] if self.state == "thinking" else [ContentDelta(text)]
