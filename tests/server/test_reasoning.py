"""--reasoning-parser: the splitter on its own (every way a text can arrive in pieces), the
grammar that leaves the thinking free and constrains the answer (llguidance on the default
model's tokenizer), and a real server whose chat template opens the thinking (fixtures/
thinking_chatml.jinja): each API's split equals the raw completion of the same prompt, split
by a regex here."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from quantserve.server.api.reasoning import ReasoningDelta, reasoning_for
from quantserve.server.api.tool_parsers import ContentDelta
from quantserve.server.engine.grammar import StructuredOutput

from .apis_helpers import MODEL, thinking_server  # noqa: F401 - the fixture

TEXT = "The user asks.\nParis is it.\n</think>\n\nThe capital is Paris."


def _split(reasoning, text: str, cuts: list[int]) -> tuple[str, str]:
    splitter = reasoning.splitter()
    events, last = [], 0
    for cut in [*cuts, len(text)]:
        events += splitter.feed(text[last:cut])
        last = cut
    events += splitter.finish()
    return ("".join(e.text for e in events if isinstance(e, ReasoningDelta)),
            "".join(e.text for e in events if isinstance(e, ContentDelta)))


def test_splitter_agrees_on_every_cut():
    inside = reasoning_for("qwen3", "<|im_start|>assistant\n<think>\n", {})
    assert inside.starts_inside
    for a in range(len(TEXT)):
        for b in (a, a + 3, a + 9):
            assert _split(inside, TEXT, sorted({a, min(b, len(TEXT))})) == ("The user asks.\nParis is it.\n",
                                                                             "The capital is Paris.")


def test_where_the_thinking_starts():
    # deepseek_r1: no tags at all is all thinking (R1 writes no opening tag); qwen3: all answer.
    r1 = reasoning_for("deepseek_r1", "<|im_start|>assistant\n", {})
    assert _split(r1, "just thinking", []) == ("just thinking", "")
    qwen = reasoning_for("qwen3", "<|im_start|>assistant\n", {})
    assert _split(qwen, "just an answer", []) == ("", "just an answer")
    assert _split(qwen, "  <think>hm</think> yes", [3, 5]) == ("hm", "yes")
    # A template that closed an empty thinking (enable_thinking: false): the output is the answer.
    closed = reasoning_for("deepseek_r1", "assistant\n<think>\n\n</think>\n\n", {})
    assert not closed.starts_inside and _split(closed, "Paris.", []) == ("", "Paris.")
    assert reasoning_for(None, "", {}) is None
    with pytest.raises(ValueError):
        reasoning_for("granite", "", {})


def test_wrapped_grammar_leaves_thinking_free_and_constrains_the_answer(default_model_dir):
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    spec = StructuredOutput.json_schema(schema)

    def accepts(reasoning, text: str) -> bool:
        grammar = reasoning.wrap(spec).to_grammar()
        matcher = llguidance.LLMatcher(lltok, grammar)
        ok = matcher.consume_tokens(tokenizer.encode(text))
        return ok and not matcher.is_error() and matcher.is_accepting()

    inside = reasoning_for("deepseek_r1", "<think>\n", {})
    assert accepts(inside, 'anything {"b": "x"} at all </think>\n\n{"a": 12}')
    assert not accepts(inside, 'thinking </think> {"b": 1}')  # the answer must follow the schema
    assert not accepts(inside, '{"a": 1}')  # no </think> yet: still thinking, nothing accepted
    optional = reasoning_for("qwen3", "assistant\n", {})
    assert accepts(optional, '{"a": 3}') and accepts(optional, '<think>hmm</think>{"a": 3}')


# ------------------------------------------------------------------ a real server


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def raw(thinking_server):
    """The oracle: the same prompt (/tokenize renders it) completed greedily, split by a regex."""
    ids = thinking_server.post("/tokenize", {"model": MODEL, "messages": MESSAGES}).json()["tokens"]
    out = thinking_server.openai().completions.create(model=MODEL, prompt=ids, max_tokens=60, temperature=0)
    text = out.choices[0].text
    match = re.fullmatch(r"(.*?)</think>\s*(.*)", text, re.S)
    assert match, f"the fixture model did not close its thinking: {text!r}"
    return match.group(1), match.group(2)


def test_chat_completions_split(thinking_server, raw):
    client = thinking_server.openai()
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0)
    message = whole.choices[0].message
    assert (message.reasoning_content, message.content) == raw
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == raw
    assert not any(getattr(d, "reasoning_content", None) and d.content for d in deltas)  # never both in one delta


def test_responses_and_messages_split(thinking_server, raw):
    r = thinking_server.openai().responses.create(model=MODEL, input=MESSAGES[0]["content"], max_output_tokens=60,
                                                  temperature=0)
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "message"]
    assert r.output[0].content[0].text == raw[0] and r.output_text == raw[1]
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    client = thinking_server.anthropic()
    kw = dict(model=MODEL, max_tokens=60, messages=MESSAGES, extra_body={"temperature": 0})
    message = client.messages.create(**kw)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert (message.content[0].thinking, message.content[1].text) == raw
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert (final.content[0].thinking, final.content[1].text) == raw


def test_json_schema_constrains_only_the_answer(thinking_server):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    out = thinking_server.openai().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    message = out.choices[0].message
    assert message.reasoning_content  # the thinking was free text, not JSON
    jsonschema.validate(json.loads(message.content), schema)


def test_enable_thinking_false_through_chat_template_kwargs(thinking_server, default_model_dir):
    from transformers import AutoTokenizer

    from .apis_helpers import THINKING_TEMPLATE

    client = thinking_server.openai()
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = out.choices[0].message
    assert getattr(message, "reasoning_content", None) is None and message.content
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    expected = tokenizer.apply_chat_template(MESSAGES, chat_template=THINKING_TEMPLATE.read_text(), tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    assert expected.endswith("<think>\n\n</think>\n\n")  # the template wrote an empty thinking
    assert out.usage.prompt_tokens == len(tokenizer(expected).input_ids)
