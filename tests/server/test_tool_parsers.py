"""Tool-call formats without a server: the parsers split text into content and calls the same way
streamed (any chunking) as whole, the forcing grammars accept exactly what the parsers read, and
chat templates that cannot render tools are refused."""

from __future__ import annotations

import json
import random

import pytest

from quantserve.server.api import protocol as p
from quantserve.server.api.errors import APIError
from quantserve.server.api.registry import ServedModel
from quantserve.server.api.tool_parsers import FORMATS, collect_events, detect_format, parse_all
from quantserve.server.api.tools import CHATML_TOOLS_TEMPLATE, render_chat

HERMES, LLAMA, MISTRAL = FORMATS["hermes"], FORMATS["llama3_json"], FORMATS["mistral"]
ARGS = '{"city": "Paris", "nested": {"list": [1, "}]\\"", {"a": null}]}}'

CASES = [
    # (format, forced, text, expected content, expected [(name, arguments)])
    (HERMES, False, f'Checking.<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>',
     "Checking.", [("get_weather", ARGS)]),
    (HERMES, False, '<tool_call>\n{"arguments": {"x": 1}, "name": "late_name"}\n</tool_call>\n'
                    '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
     "", [("late_name", '{"x": 1}'), ("b", "{}")]),
    (HERMES, False, '<tool_call>[{"name": "a", "arguments": {"q": 2}}, {"name": "b"}]</tool_call>',
     "", [("a", '{"q": 2}'), ("b", "{}")]),  # SmolLM2's card writes a list in one tag
    (HERMES, False, "Just text, with a <tool_ marker that never completes", "Just text, with a <tool_ marker that "
     "never completes", []),
    (HERMES, False, "Broken <tool_call> {not json at all", "Broken <tool_call> {not json at all", []),
    (HERMES, True, f'<tool_call>\n{{"name": "f", "arguments": {ARGS}}}\n</tool_call>', "", [("f", ARGS)]),
    (LLAMA, False, ' {"name": "f", "parameters": {"q": "x"}}; {"name": "g", "parameters": {}}',
     "", [("f", '{"q": "x"}'), ("g", "{}")]),
    (LLAMA, False, '<|python_tag|>{"name": "f", "parameters": {"q": 1}}', "", [("f", '{"q": 1}')]),
    (LLAMA, False, 'The answer is {"name": "f"}', 'The answer is {"name": "f"}', []),
    (MISTRAL, False, 'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"q": 1}}, {"name": "g", "arguments": {}}]',
     "Sure. ", [("f", '{"q": 1}'), ("g", "{}")]),
]


@pytest.mark.parametrize("fmt,forced,text,content,calls", CASES)
def test_whole_and_streamed_parses_agree(fmt, forced, text, content, calls):
    got_content, got_calls = parse_all(fmt, text, forced)
    assert got_content == content
    assert [(c["name"], c["arguments"]) for c in got_calls] == calls
    for c in got_calls:
        json.loads(c["arguments"])
        assert c["id"].startswith("call_")
    rng = random.Random(len(text))
    for _ in range(5):  # random chunkings, down to one character
        parser, events, i = fmt.parser(forced), [], 0
        while i < len(text):
            step = rng.randint(1, 6)
            events += parser.feed(text[i:i + step])
            i += step
        events += parser.finish()
        streamed_content, streamed_calls = collect_events(events)
        assert streamed_content == content
        assert [(c["name"], c["arguments"]) for c in streamed_calls] == calls
        # OpenAI's delta shape: a call's first delta has its id and name, the rest only arguments.
        firsts = [e for e in events if getattr(e, "id", None) is not None]
        assert [e.name for e in firsts] == [name for name, _ in calls]
        assert all(e.name is None for e in events if hasattr(e, "index") and e.id is None)


def test_formats_are_recognized_from_templates():
    assert detect_format(CHATML_TOOLS_TEMPLATE) == "hermes"
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("{{ '<|python_tag|>' }}{{ 'ipython' }}") == "llama3_json"
    assert detect_format("{{ messages }}") is None


FUNCTIONS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}},
    {"name": "no_args"},
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("fmt,forced,text,ok", [
    (HERMES, True, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>',
     True),
    (HERMES, True, '<tool_call>\n{"name": "no_args", "arguments": {}}\n</tool_call>\n'
                   '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}\n</tool_call>', True),
    (HERMES, True, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "k"}}\n</tool_call>',
     False),
    (HERMES, True, '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>', False),
    (HERMES, True, 'Hello', False),
    (LLAMA, True, '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}; {"name": "no_args", '
                  '"parameters": {}}', True),
    (MISTRAL, True, '[TOOL_CALLS][{"name": "no_args", "arguments": {}}]', True),
    # auto: free text, or text then calls that parse and end the message.
    (HERMES, False, 'It is sunny in Oslo today.', True),
    (HERMES, False, 'Let me look. <tool_call>\n{"name": "no_args", "arguments": {}}\n</tool_call>', True),
    (HERMES, False, 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}', False),
    (HERMES, False, '<tool_call>\n{"name": "no_args", "arguments": {}}\n</tool_call> and more text', False),
    (LLAMA, False, 'No call needed.', True),
    (LLAMA, False, '{"name": "no_args", "parameters": {}}', True),
    (LLAMA, False, '{"name": "no_args", "arguments": {}}', False),
    (MISTRAL, False, 'Hm. [TOOL_CALLS][{"name": "no_args", "arguments": {}}]', True),
    (MISTRAL, False, 'Hm. [TOOL_CALLS] nothing', False),
])
def test_grammars_accept_exactly_what_parsers_read(tokenizer, fmt, forced, text, ok):
    import llguidance
    import llguidance.hf

    grammar = llguidance.LLMatcher.grammar_from_lark(fmt.grammar(FUNCTIONS, True, {}, forced))
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar, log_level=0)
    accepted = matcher.consume_tokens(tokenizer.encode(text)) and matcher.is_accepting()
    assert accepted == ok, matcher.get_error()
    if ok:
        content, calls = parse_all(fmt, text, forced)
        assert all(c["name"] in {"get_weather", "no_args"} for c in calls)
        assert bool(calls) == ("name" in text) and ("{" not in content)


def _served(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return ServedModel(name="m", engine=None, tokenizer=tok, max_model_len=2048)


def _request(**kw):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": FUNCTIONS[0]["parameters"]}}]
    return p.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": tools, **kw})


def test_chatml_template_that_ignores_tools_renders_them_in_hermes_format(tokenizer):
    served = _served(tokenizer, tokenizer.chat_template)  # SmolLM2's own: no tools in it
    body = _request(tool_choice="required")
    prompt, tools = render_chat(served, body)
    text = tokenizer.decode(prompt)
    assert "<tools>" in text and '"name": "get_weather"' in text and text.endswith("<|im_start|>assistant\n")
    assert tools.fmt.name == "hermes" and tools.mode == "required"
    assert body._tool_grammar is not None and "get_weather" in body._tool_grammar
    # Without tools the model's own template is used, unchanged.
    plain = p.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    prompt, tools = render_chat(served, plain)
    assert tools is None and prompt == list(tokenizer.apply_chat_template(
        plain.chat_messages(), add_generation_prompt=True, tokenize=True, return_dict=False))


def test_template_that_renders_tools_is_used_as_is(tokenizer):
    template = ("{% for t in tools %}TOOL {{ t.function.name }} <tool_call>\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    prompt, tools = render_chat(_served(tokenizer, template), _request())
    assert tokenizer.decode(prompt).startswith("TOOL get_weather <tool_call>")
    assert tools.mode == "auto" and tools.fmt.name == "hermes"


def test_template_that_cannot_render_tools_is_a_400(tokenizer):
    llama2 = "{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
    with pytest.raises(APIError) as info:
        render_chat(_served(tokenizer, llama2), _request())
    assert info.value.status == 400 and info.value.param == "tools" and "cannot render tools" in info.value.message
    # A format it does not say: 400 unless --tool-call-parser names one.
    template = "{% for t in tools %}{{ t.function.name }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(APIError) as info:
        render_chat(_served(tokenizer, template), _request())
    assert "--tool-call-parser" in info.value.message
    _, tools = render_chat(_served(tokenizer, template), _request(), "llama3_json")
    assert tools.fmt.name == "llama3_json"
