"""Tools in chat requests: the prompt with the tools and tool results rendered by the chat
template, the tool-call format of the model, and the grammar that forces a call.

A template renders tools when giving it tools changes what it writes. Many ChatML models
(SmolLM2, the default model, among them) ship a template that ignores them: for those we render
with a built-in ChatML template in the Hermes format (tools listed in the system turn, calls as
<tool_call> JSON, results as <tool_response>), the format Qwen 2.5 and Hermes use, and log it.
Any other template that ignores tools is a 400 that says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Optional

from ..engine.schema_strict import strict_schema
from . import protocol as p
from .errors import bad_request
from .output import OutputReader
from .reasoning import END, START, reasoning_for
from .registry import ServedModel
from .tool_parsers import FORMATS, ToolCallParser, ToolFormat, detect_format

logger = logging.getLogger("quantserve.server")

# Hermes / Qwen 2.5 tool format on ChatML.
CHATML_TOOLS_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within ' }}
{{- '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}' }}
{{- '\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' and loop.first %}
{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}
{{- '<|im_start|>assistant' }}
{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}
{%- for call in message['tool_calls'] %}
{%- set args = call['function']['arguments'] %}
{{- '\\n<tool_call>\\n{"name": "' + call['function']['name'] + '", "arguments": ' }}
{{- (args if args is string else (args | tojson)) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message['role'] == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

_PROBE_TOOL = {"type": "function", "function": {
    "name": "quantserve_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}}}


@dataclasses.dataclass(frozen=True)
class ToolContext:
    """How a chat request's output is read: tool_choice's mode and the model's call format."""

    mode: str  # auto | required | named
    fmt: ToolFormat

    def parser(self) -> ToolCallParser:
        # required / named: a grammar made the output tool calls, nothing else.
        return self.fmt.parser(forced=self.mode != "auto")


def prepare_chat(served: ServedModel, body: p.ChatCompletionRequest, tool_call_parser: Optional[str] = None,
                 reasoning_parser: Optional[str] = None) -> tuple[list[int], OutputReader]:
    """The prompt's token ids and how to read the output (thinking, content, tool calls), for
    any API's request once converted to a chat request. Sets the body's constraints: the tool
    grammar (render_chat), and the thinking it must leave free. Runs off the loop."""
    prompt, tools = render_chat(served, body, tool_call_parser)
    reasoning = None
    if reasoning_parser is not None:
        # The prompt's last tokens say whether the template opened the thinking (reasoning.py).
        tail = served.decode(prompt[-8:])
        reasoning = reasoning_for(reasoning_parser, tail, special_token_ids(served.tokenizer, (START, END)))
        body._reasoning = reasoning
    return prompt, OutputReader(tools, reasoning, body.parallel_tool_calls)


def render_chat(served: ServedModel, body: p.ChatCompletionRequest,
                tool_call_parser: Optional[str] = None) -> tuple[list[int], Optional[ToolContext]]:
    """The prompt's token ids, and how to read tool calls in the output (None: plain content).
    For "required" and named tool choices, sets the body's tool-call grammar. Runs off the loop."""
    messages = body.chat_messages()
    tools = body.tool_dicts()
    extra = body.chat_template_kwargs or {}
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not uses_tools:
        return served.render_chat(messages, template_kwargs=extra), None
    tokenizer = served.tokenizer
    template = _tool_template(served.name, getattr(tokenizer, "chat_template", None))
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                             add_generation_prompt=True, tokenize=False, **extra)
    except Exception as exc:  # a template rejecting a role order etc. is the client's input
        raise bad_request(f"the chat template rejected these messages: {exc}", "messages") from None
    prompt = served.encode(text, add_special_tokens=False)  # the template wrote any BOS itself
    mode = body.effective_tool_choice()
    if mode == "none":
        return prompt, None
    constrained = body.structured_outputs is not None or (
        body.response_format is not None and body.response_format.type != "text")
    if constrained:  # one grammar shapes an output: a JSON answer, or tool calls
        raise bad_request(f"response_format and structured_outputs cannot be combined with tool_choice '{mode}'; "
                          "send tool_choice 'none' to constrain the answer", "response_format")
    name = tool_call_parser or detect_format(template)
    if name is None:
        raise bad_request(f"cannot tell the tool-call format of model '{served.name}' from its chat template; "
                          "start the server with --tool-call-parser", "tools")
    fmt = FORMATS[name]
    strict = {t.function.name for t in body.tools or () if t.function.strict}
    functions = [_strict_function(t["function"], t["function"]["name"] in strict) for t in tools or ()]
    if mode == "named":
        functions = [f for f in functions if f["name"] == body.tool_choice.function.name]
    # "auto" is constrained too (text, or text then calls that parse), unless the request has
    # stop conditions, which a grammar cannot share the end of the output with: then it is read
    # as the model wrote it. A named choice is exactly one call (as OpenAI returns), whatever
    # parallel_tool_calls says; "required" with parallel calls allows one call or more, each of a
    # different function, in the tools' order (tool_parsers._calls): bounded, never repeated.
    if mode != "auto" or not (body.stop or body.stop_token_ids or body.ignore_eos):
        body._tool_grammar = fmt.grammar(functions, body.parallel_tool_calls and mode != "named",
                                         _special_ids(tokenizer, fmt), forced=mode != "auto")
    return prompt, ToolContext(mode, fmt)


def _strict_function(function: dict, strict: bool) -> dict:
    """A function with strict: true gets OpenAI's strict parameters (schema_strict.py)."""
    if not strict or not isinstance(function.get("parameters"), dict):
        return function
    return {**function, "parameters": strict_schema(function["parameters"])}


def _tool_template(model: str, template: Any) -> str:
    if not isinstance(template, str):
        raise bad_request(f"model '{model}' has no chat template to render tools with; use /v1/completions", "tools")
    if _renders_tools(template):
        return template
    if "<|im_start|>" in template:
        _log_fallback(model)
        return CHATML_TOOLS_TEMPLATE
    raise bad_request(f"the chat template of model '{model}' cannot render tools (it ignores them)", "tools")


@functools.lru_cache(maxsize=16)
def _renders_tools(template: str) -> bool:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "hi"}]
    try:
        with_tools = render_jinja_template([messages], tools=[_PROBE_TOOL], chat_template=template)[0][0]
    except Exception:  # noqa: BLE001 - a template that fails on tools cannot render them
        return False
    return "quantserve_probe_tool" in with_tools


@functools.lru_cache(maxsize=16)
def _log_fallback(model: str) -> None:
    logger.info("model '%s': its ChatML template ignores tools; rendering tools in the Hermes format", model)


def _special_ids(tokenizer: Any, fmt: ToolFormat) -> dict[str, int]:
    """The format's markers that are special tokens of the model (the grammar names them by id)."""
    return special_token_ids(tokenizer, (*fmt.start_markers, "</tool_call>", "[TOOL_CALLS]"))


def special_token_ids(tokenizer: Any, texts: tuple[str, ...]) -> dict[str, int]:
    """Those of `texts` that are special tokens of the model, with their ids."""
    found = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for token_id, added in decoder.items():
        text = getattr(added, "content", None)
        if getattr(added, "special", False) and text in texts:
            found[text] = int(token_id)
    return found
