"""Tool-call formats per model family: how a model writes calls, the grammar that forces one
("required" / a named function), and an incremental parser that splits its output into content
and tool calls (the same parser for streamed and whole responses, so both always agree).

Formats (vLLM's --tool-call-parser names):
  hermes       <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>  (Hermes, Qwen 2/2.5/3,
               ChatML models; a JSON list inside one tag, as SmolLM2's card shows, parses too)
  llama3_json  {"name": ..., "parameters": {...}} as the whole message, several joined by "; ",
               optionally after <|python_tag|> (Llama 3.1 / 3.2 / 3.3)
  mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Optional, Union

# Properties in schema order, the JSON written as json.dumps writes it (see engine/grammar.py).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclasses.dataclass
class ContentDelta:
    text: str


@dataclasses.dataclass
class CallDelta:
    """A piece of tool call `index`: its id and name come once, first; then argument fragments."""

    index: int
    arguments: str = ""
    id: Optional[str] = None
    name: Optional[str] = None


Event = Union[ContentDelta, CallDelta]


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------ formats


class ToolFormat:
    name = ""
    start_markers: tuple[str, ...] = ()  # text that switches from content to tool calls
    arguments_keys: tuple[str, ...] = ("arguments",)  # the key of the arguments in a call object
    calls_only_at_start = False  # the calls are the whole message (no content before them)

    def call_schema(self, function: dict[str, Any]) -> dict[str, Any]:
        """The JSON schema of one call object of this function (name first, then its arguments)."""
        parameters = function.get("parameters") or _NO_ARGUMENTS
        return {"type": "object", "properties": {"name": {"const": function["name"]}, self.arguments_keys[0]: parameters},
                "required": ["name", self.arguments_keys[0]], "additionalProperties": False,
                "x-guidance": _JSON_STYLE}

    def grammar(self, functions: list[dict[str, Any]], parallel: bool, special: dict[str, int],
                forced: bool = True) -> str:
        """Lark (llguidance) grammar of this format's calls of these functions.

        forced ("required", a named function): the message is calls, nothing else: one call, or
        with `parallel` one call or more of distinct functions, in the tools' order (_calls).
        Otherwise ("auto"): free text, or text up to the start marker and then calls, each
        with its function's arguments, that end the message: a call the model starts always
        parses. special: the markers that are special tokens of the model (by id): the grammar
        must produce the token itself, not its spelling.
        """
        raise NotImplementedError

    def parser(self, forced: bool) -> "ToolCallParser":
        return ToolCallParser(self, forced)


def _literal(text: str, special: dict[str, int]) -> str:
    return f"<[{special[text]}]>" if text in special else json.dumps(text)


def _alternatives(fmt: ToolFormat, functions: list[dict[str, Any]]) -> str:
    return "\n".join(f"fn_{i}: %json {json.dumps(fmt.call_schema(f))}" for i, f in enumerate(functions))


def _choice(functions: list[dict[str, Any]]) -> str:
    return "(" + " | ".join(f"fn_{i}" for i in range(len(functions))) + ")"


_ANY_ORDER_UP_TO = 5  # tools: beyond, distinct calls follow the tools' order (2^F rules otherwise)


def _calls(functions: list[dict[str, Any]], parallel: bool, item: str, sep: str) -> tuple[str, str]:
    """(expression, its extra rules) of forced calls: one call, or with `parallel` one call or more,
    each of a different function: bounded by the number of tools, the same call never twice. In
    any order for up to _ANY_ORDER_UP_TO tools (a rule per set of functions already called), in
    the tools' order beyond (a rule per tool). `item` wraps one call (FN stands for the call), `sep`
    goes between calls."""
    count = len(functions)
    if not parallel or count == 1:
        return item.replace("FN", _choice(functions)), ""
    rules = []
    if count <= _ANY_ORDER_UP_TO:
        for used in range((1 << count) - 1):  # calls_<used>: the next call and the rest, `used` called already
            options = [f"{item.replace('FN', f'fn_{i}')}"
                       + (f" ({sep} calls_{used | 1 << i})?" if used | 1 << i != (1 << count) - 1 else "")
                       for i in range(count) if not used >> i & 1]
            rules.append(f"calls_{used}: " + " | ".join(options))
    else:
        for i in range(count):  # calls_<i>: calls of functions i.. in order
            one = item.replace("FN", f"fn_{i}")
            rules.append(f"calls_{i}: {one}" if i == count - 1 else
                         f"calls_{i}: {one} ({sep} calls_{i + 1})? | calls_{i + 1}")
    return "calls_0", "\n".join(rules) + "\n"


def _with_text(marker: str, special: dict[str, int], calls: str) -> str:
    """start: any text, or text then the marker then calls. The marker ends the text as soon as
    it appears (a lazy lexeme), so text never contains an unconstrained call."""
    if marker in special:  # text cannot hold a special token: no need to end it lazily
        head = f"head: TEXT {_literal(marker, special)}"
    else:
        head = f"head[lazy]: TEXT {_literal(marker, special)}"
    return f"%llguidance {{}}\nstart: TEXT | head {calls}\n{head}\nTEXT: /(.|\\n)*/\n"


class HermesFormat(ToolFormat):
    name = "hermes"
    start_markers = ("<tool_call>",)

    def grammar(self, functions: list[dict[str, Any]], parallel: bool, special: dict[str, int],
                forced: bool = True) -> str:
        open_, close = _literal("<tool_call>", special), _literal("</tool_call>", special)
        body = f'"\\n" {_choice(functions)} "\\n" {close}'
        if forced:  # one call, or distinct functions' calls (_calls)
            calls, rules = _calls(functions, parallel, f'"\\n" FN "\\n" {close}', f'"\\n" {open_}')
            return f"start: {open_} {calls}\n" + rules + _alternatives(self, functions)
        more = f' ("\\n" {open_} {body})*' if parallel else ""
        return _with_text("<tool_call>", special, body + more) + _alternatives(self, functions)


class Llama3JsonFormat(ToolFormat):
    name = "llama3_json"
    start_markers = ("<|python_tag|>",)
    arguments_keys = ("parameters", "arguments")
    calls_only_at_start = True

    def grammar(self, functions: list[dict[str, Any]], parallel: bool, special: dict[str, int],
                forced: bool = True) -> str:
        calls = _choice(functions) + (f' ("; " {_choice(functions)})*' if parallel else "")
        if forced:  # one call, or distinct functions' calls (_calls)
            forced_calls, rules = _calls(functions, parallel, "FN", '"; "')
            return f"start: {forced_calls}\n" + rules + _alternatives(self, functions)
        # Calls are the whole message: anything else must not begin with "{".
        return (f"start: TEXT | {calls}\nTEXT: /(\\s*[^{{\\s](.|\\n)*)?/\n"
                + _alternatives(self, functions))


class MistralFormat(ToolFormat):
    name = "mistral"
    start_markers = ("[TOOL_CALLS]",)

    def grammar(self, functions: list[dict[str, Any]], parallel: bool, special: dict[str, int],
                forced: bool = True) -> str:
        calls = f'"[" {_choice(functions)}' + (f' (", " {_choice(functions)})*' if parallel else "") + ' "]"'
        if forced:  # one call, or distinct functions' calls (_calls)
            forced_calls, rules = _calls(functions, parallel, "FN", '", "')
            return f"start: {_literal('[TOOL_CALLS]', special)} \"[\" {forced_calls} \"]\"\n" + rules \
                + _alternatives(self, functions)
        return _with_text("[TOOL_CALLS]", special, calls) + _alternatives(self, functions)


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HermesFormat(), Llama3JsonFormat(), MistralFormat())}


def detect_format(template: str) -> Optional[str]:
    """The format a chat template teaches its model, from the markers it writes."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return "llama3_json"
    return None


# ------------------------------------------------------------------------------ parsing


class _CallObject:
    """Scans one call object ({"name": ..., "arguments": ...}) as its text arrives."""

    def __init__(self, arguments_keys: tuple[str, ...]) -> None:
        self.arguments_keys = arguments_keys
        self.text = ""
        self.depth = 0
        self.in_string = self.escape = False
        self.key: Optional[str] = None  # the key whose value is being read (depth 1)
        self.expect_key = True
        self.token_start = 0  # where the current key string / value began in self.text
        self.value_start: Optional[int] = None
        self.name: Optional[str] = None
        self.args_start: Optional[int] = None
        self.args_end: Optional[int] = None
        self.done = False

    def feed(self, ch: str) -> None:
        i = len(self.text)
        self.text += ch
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 1 and self.expect_key:
                    try:
                        self.key = json.loads(self.text[self.token_start:])
                    except ValueError:
                        self.key = None
            return
        if ch.isspace():
            return
        if self.depth == 1 and not self.expect_key and self.value_start is None and ch not in ":,}":
            self.value_start = i
            if self.key in self.arguments_keys and self.args_start is None:
                self.args_start = i
        if ch == '"':
            self.in_string = True
            if self.depth == 1 and self.expect_key:
                self.token_start = i
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 1 and self.value_start is not None and self._is_args():
                self.args_end = i + 1
            if self.depth == 0:
                self._end_value(i)
                self.done = True
        elif ch == ":" and self.depth == 1:
            self.expect_key = False
            self.value_start = None
        elif ch == "," and self.depth == 1:
            self._end_value(i)
            self.expect_key = True
            self.key = None

    def _is_args(self) -> bool:
        return self.key in self.arguments_keys and self.args_start == self.value_start

    def _end_value(self, end: int) -> None:
        if self.value_start is None:
            return
        raw = self.text[self.value_start:end].strip()
        if self.key == "name" and self.name is None:
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            if isinstance(value, str):
                self.name = value
        elif self._is_args() and self.args_end is None:
            self.args_end = self.value_start + len(raw)
        self.value_start = None

    def arguments_so_far(self) -> str:
        """The arguments' text known to be final: a container's text as it grows, a scalar's once complete."""
        if self.args_start is None:
            return ""
        if self.args_end is not None:
            return self.text[self.args_start:self.args_end]
        if self.text[self.args_start] in "{[":
            return self.text[self.args_start:]
        return ""

    def valid(self) -> bool:
        if self.name is None:
            return False
        try:
            json.loads(self.text)
        except ValueError:
            return False
        return True


class ToolCallParser:
    """Splits one choice's text into content and tool calls, incrementally.

    forced: the output is known to be tool calls (a grammar made it so): no content at all.
    Otherwise ("auto"), text is content until a start marker of the format (or, for formats whose
    calls are the whole message, a leading "{"); the text after it is held back until a call has
    a name, and becomes content after all if no call ever does. Text between and after calls is
    markup, never content: content and calls are never mixed.
    """

    def __init__(self, fmt: ToolFormat, forced: bool = False) -> None:
        self.fmt = fmt
        self.in_calls = forced
        self.pending = ""  # content held back: it may be the start of a marker
        self.held = ""  # text since tool calls began, until a call is committed
        self.committed = forced
        self.calls: list[dict[str, Any]] = []  # {"id", "name", "sent": argument chars sent}
        self.current: Optional[_CallObject] = None
        self.outer_depth = 0  # [ ... ] around calls (Mistral, SmolLM2's list form)
        self.seen_text = False

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if not self.in_calls:
            text = self._content(text, events)
        if self.in_calls and text:
            self._calls(text, events)
        return events

    def finish(self) -> list[Event]:
        """The end of the output: held text that turned out not to be a call is content."""
        events: list[Event] = []
        if not self.in_calls and self.pending:
            events.append(ContentDelta(self.pending))
        elif self.in_calls and not self.committed and self.held:
            events.append(ContentDelta(self.held))
        self.pending = self.held = ""
        return events

    # -- content mode

    def _content(self, text: str, events: list[Event]) -> str:
        buf = self.pending + text
        self.pending = ""
        if self.fmt.calls_only_at_start and not self.seen_text:
            stripped = buf.lstrip()
            if not stripped:
                self.pending = buf
                return ""
            marker = next((m for m in self.fmt.start_markers if m.startswith(stripped[:len(m)])), None)
            if stripped.startswith("{") or (marker and stripped.startswith(marker)):
                self.in_calls = True
                self.seen_text = True
                rest = stripped[len(marker):] if marker and stripped.startswith(marker) else stripped
                self.held = buf[: len(buf) - len(rest)]
                return rest
            if marker and len(stripped) < len(marker):
                self.pending = buf  # may still become the marker
                return ""
            self.seen_text = True
        found = [(buf.find(m), m) for m in self.fmt.start_markers if m in buf]
        if found and not self.fmt.calls_only_at_start:
            at, marker = min(found)
            if at:
                events.append(ContentDelta(buf[:at]))
            self.in_calls = True
            self.held = marker
            return buf[at + len(marker):]
        keep = 0 if self.fmt.calls_only_at_start else _partial_marker(buf, self.fmt.start_markers)
        if len(buf) > keep:
            events.append(ContentDelta(buf[: len(buf) - keep]))
        self.pending = buf[len(buf) - keep:]
        return ""

    # -- tool-call mode

    def _calls(self, text: str, events: list[Event]) -> None:
        for ch in text:
            if not self.committed:
                self.held += ch
            if self.current is None:
                if ch == "{":
                    self.current = _CallObject(self.fmt.arguments_keys)
                elif ch == "[":
                    self.outer_depth += 1
                elif ch == "]":
                    self.outer_depth = max(0, self.outer_depth - 1)
                else:
                    continue
                if self.current is None:
                    continue
            self.current.feed(ch)
            if self.current.done:
                self._emit(events, final=True)
                self.current = None
        if self.current is not None:
            self._emit(events, final=False)

    def _emit(self, events: list[Event], final: bool) -> None:
        obj = self.current
        if obj is None or obj.name is None or (final and not obj.valid()):
            return
        if not self.calls or self.calls[-1]["obj"] is not obj:
            self.calls.append({"obj": obj, "id": call_id(), "sent": 0})
            self.committed = True
            self.held = ""
            events.append(CallDelta(len(self.calls) - 1, "", self.calls[-1]["id"], obj.name))
        call = self.calls[-1]
        arguments = obj.arguments_so_far()
        if final and obj.args_start is None:
            arguments = "{}"  # a call without arguments: OpenAI always sends a JSON object
        if len(arguments) > call["sent"]:
            events.append(CallDelta(len(self.calls) - 1, arguments[call["sent"]:]))
            call["sent"] = len(arguments)


def _partial_marker(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of text could begin one of the markers."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                best = max(best, k)
                break
    return best


def parse_all(fmt: ToolFormat, text: str, forced: bool = False) -> tuple[str, list[dict[str, str]]]:
    """(content, [{"id", "name", "arguments"}]) of a whole output, with the streaming parser."""
    parser = fmt.parser(forced)
    return collect_events(parser.feed(text) + parser.finish())


def collect_events(events: list[Event]) -> tuple[str, list[dict[str, str]]]:
    content: list[str] = []
    calls: list[dict[str, str]] = []
    for e in events:
        if isinstance(e, ContentDelta):
            content.append(e.text)
        elif e.id is not None:
            calls.append({"id": e.id, "name": e.name or "", "arguments": e.arguments})
        else:
            calls[e.index]["arguments"] += e.arguments
    return "".join(content), calls
