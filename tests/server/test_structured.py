"""Structured outputs and tool calls end to end: one real `quantserve serve` process on the default
model, the official openai client, and jsonschema as the judge of every answer."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from .serving import MODEL, start_server

# Bounded everywhere (lengths, item counts, integer ranges): a schema the model cannot finish
# within max_tokens would make "length" a legitimate answer and the test unable to fail.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "email": {"type": "string", "pattern": "^[a-z]{3,8}@example\\.com$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 1,
                   "maxItems": 3},
        "nickname": {"type": "string", "maxLength": 8},  # optional
        "active": {"type": "boolean"},  # optional
    },
    "required": ["name", "age", "email", "role", "address", "scores"],
    "additionalProperties": False,
}
INVENTORY = {
    "type": "array",
    "minItems": 1,
    "maxItems": 2,
    "items": {
        "anyOf": [
            {"type": "object", "properties": {"kind": {"const": "tool"}, "weight": {"type": "number", "minimum": 0,
                                                                                   "exclusiveMaximum": 10,
                                                                                   "multipleOf": 0.5}},
             "required": ["kind", "weight"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "food"}, "vegan": {"type": "boolean"}},
             "required": ["kind", "vegan"], "additionalProperties": False},
        ]
    },
}
ASK = [{"role": "user", "content": "Describe a person who works at a bakery, as JSON."}]
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{2,9}/[A-Z][a-z]{2,11}$"}},
               "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": TIME_PARAMS}},
]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
WEATHER_Q = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server(default_model_dir):
    with start_server() as srv:
        yield srv


def _response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def _stream_choices(stream) -> tuple[dict[int, str], dict[int, str], dict[int, dict]]:
    """(content per choice, finish_reason per choice, tool calls per choice assembled from deltas)."""
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    calls: dict[int, dict] = {}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                text[choice.index] = text.get(choice.index, "") + delta.content
            for call in delta.tool_calls or ():
                got = calls.setdefault(choice.index, {}).setdefault(call.index, {"arguments": ""})
                if call.id is not None:  # the first delta of a call: its id, type and name, once
                    assert "id" not in got and call.type == "function" and call.function.name
                    got.update(id=call.id, name=call.function.name)
                else:
                    assert call.function.name is None
                got["arguments"] += call.function.arguments or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return text, finish, calls


# ------------------------------------------------------------------------------ response_format


@pytest.mark.parametrize("schema", [PERSON, INVENTORY], ids=["person", "inventory"])
def test_json_schema_answers_validate(server, schema):
    resp = server.client().chat.completions.create(
        model=MODEL, messages=ASK, response_format=_response_format(schema), max_tokens=160, temperature=0.8,
        n=2, seed=11)
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_streamed_with_seed_and_n(server):
    kw = dict(model=MODEL, messages=ASK, response_format=_response_format(PERSON), max_tokens=160,
              temperature=0.8, seed=5, n=2)
    text, finish, _ = _stream_choices(server.client().chat.completions.create(stream=True, **kw))
    assert finish == {0: "stop", 1: "stop"}
    for i in (0, 1):
        jsonschema.validate(json.loads(text[i]), PERSON)
    # The seed makes the answer reproducible, streamed or not.
    again = server.client().chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [text[0], text[1]]


class Address(BaseModel):
    city: str = Field(max_length=12)
    country: Literal["FR", "DE", "IT"]


class Baker(BaseModel):
    name: str = Field(max_length=12)
    years: int = Field(ge=0, le=60)
    address: Address
    breads: list[Literal["baguette", "rye", "brioche"]] = Field(max_length=3)


def test_parse_with_a_pydantic_model(server):
    resp = server.client().chat.completions.parse(model=MODEL, messages=ASK, response_format=Baker, max_tokens=120,
                                                  temperature=0.5, seed=2)
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Baker) and isinstance(parsed.address, Address)


def test_json_object_and_completions(server):
    resp = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give a JSON object with a key 'ok' set to true."}],
        response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    # response_format on /v1/completions too, streamed.
    chunks = list(server.client().completions.create(
        model=MODEL, prompt="A city and its country, as JSON:", max_tokens=80, temperature=0, stream=True,
        extra_body={"response_format": _response_format(
            {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                              "country": {"type": "string", "maxLength": 12}},
             "required": ["city", "country"], "additionalProperties": False})}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert set(json.loads(text)) == {"city", "country"}


@pytest.mark.parametrize("spec,check", [
    ({"regex": "[A-Z][a-z]{2,9}, [0-9]{4}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,9}, [0-9]{4}", t)),
    ({"choice": ["sunny", "rainy", "cloudy"]}, lambda t: t in ("sunny", "rainy", "cloudy")),
    ({"grammar": 'root ::= "The answer is " [0-9] [0-9]? "."'}, lambda t: re.fullmatch(r"The answer is \d\d?\.", t)),
    ({"json": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
               "required": ["n"], "additionalProperties": False}}, lambda t: 0 <= json.loads(t)["n"] <= 9),
])
def test_vllm_structured_outputs(server, spec, check):
    resp = server.client().completions.create(model=MODEL, prompt="The weather today:", max_tokens=30,
                                              temperature=1.0, seed=4, n=2, extra_body={"structured_outputs": spec})
    for choice in resp.choices:
        assert choice.finish_reason == "stop" and check(choice.text), choice.text


def test_budget_ending_inside_json_is_length(server):
    resp = server.client().chat.completions.create(
        model=MODEL, messages=ASK, response_format=_response_format(PERSON), max_tokens=6, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith('{"name": ')
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)
    _, finish, _ = _stream_choices(server.client().chat.completions.create(
        model=MODEL, messages=ASK, response_format=_response_format(PERSON), max_tokens=6, temperature=0, stream=True))
    assert finish == {0: "length"}


# ------------------------------------------------------------------------------ logit_bias, min_tokens, best_of


def test_logit_bias_steers_and_min_tokens_holds_eos(server):
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0,
              logprobs=True, top_logprobs=0)
    plain = client.chat.completions.create(**kw)
    first = plain.choices[0].logprobs.content[0].token
    tokenize = httpx.post(server.url + "/tokenize", headers=server.headers(), timeout=60,
                          json={"model": MODEL, "prompt": first, "add_special_tokens": False}).json()["tokens"]
    assert len(tokenize) == 1
    banned = client.chat.completions.create(logit_bias={str(tokenize[0]): -100}, **kw)
    assert banned.choices[0].logprobs.content[0].token != first
    forced_id = 1000  # any token id: +100 makes it the greedy choice
    forced = client.chat.completions.create(logit_bias={str(forced_id): 100}, **{**kw, "max_tokens": 1})
    detok = httpx.post(server.url + "/detokenize", headers=server.headers(), timeout=60,
                       json={"model": MODEL, "tokens": [forced_id]}).json()["prompt"]
    assert forced.choices[0].logprobs.content[0].token == detok
    # min_tokens holds back stop tokens: the forced token, also a stop token, ends the output at
    # once without it, and right after min_tokens with it.
    stopping = dict(model=MODEL, messages=kw["messages"], max_tokens=12, temperature=0,
                    logit_bias={str(forced_id): 100}, extra_body={"stop_token_ids": [forced_id]})
    first = client.chat.completions.create(**stopping)
    assert first.choices[0].finish_reason == "stop" and first.usage.completion_tokens == 1
    held = client.chat.completions.create(**{**stopping, "extra_body": {"stop_token_ids": [forced_id], "min_tokens": 5}})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6


def test_best_of_equal_to_n_is_accepted(server):
    resp = server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=2, n=2, best_of=2)
    assert len(resp.choices) == 2


# ------------------------------------------------------------------------------ tools


def _check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["name"] in names and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])


@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
], ids=["required", "named"])
def test_forced_tool_calls_validate(server, choice, names):
    # One call (this small model, allowed several, goes on calling until max_tokens).
    kw = dict(model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
              max_tokens=100, temperature=0.7, seed=3)
    resp = server.client().chat.completions.create(**kw)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and msg.content is None
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls]
    _check_calls(calls, names)
    text, finish, streamed = _stream_choices(server.client().chat.completions.create(stream=True, **kw))
    assert finish == {0: "tool_calls"} and not text  # no content: calls only
    got = [streamed[0][i] for i in sorted(streamed[0])]
    _check_calls(got, names)
    assert [(c["name"], c["arguments"]) for c in got] == [(c["name"], c["arguments"]) for c in calls]


def test_parallel_tool_calls(server):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}], tools=TOOLS,
              tool_choice="required", max_tokens=60, temperature=0)
    one = server.client().chat.completions.create(parallel_tool_calls=False, **kw)
    assert len(one.choices[0].message.tool_calls) == 1 and one.choices[0].finish_reason == "tool_calls"
    # Allowed several, this model keeps calling until max_tokens: the complete calls come back
    # (the one cut short is left out of a whole response), and finish_reason says "length".
    many = server.client().chat.completions.create(**kw)
    calls = many.choices[0].message.tool_calls
    assert many.choices[0].finish_reason in ("length", "tool_calls") and calls
    _check_calls([{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in calls],
                 {"get_weather", "get_time"})


def _round(i: int, city: str, temperature: int) -> list[dict]:
    return [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"temperature": temperature})},
        {"role": "assistant", "content": f"It is {temperature} degrees in {city}."},
    ]


# Two tool-result round trips, then a new question: calling again is the natural continuation.
ROUND_TRIP = _round(1, "Paris", 18) + _round(2, "Berlin", 12) + [
    {"role": "user", "content": "What is the weather in Rome?"}]
# Left alone, this 135M model answers by imitating the tool result ("<tool_response>..."); banning
# the token "response" (logit_bias) makes it write "<tool_call>" instead, which "auto" must then
# complete into a valid call.
NUDGE = {"7639": -100}


def test_auto_answers_without_a_call_are_content(server):
    resp = server.client().chat.completions.create(model=MODEL, messages=ROUND_TRIP, tools=TOOLS, max_tokens=30,
                                                   temperature=0)
    msg = resp.choices[0].message
    assert msg.tool_calls is None and resp.choices[0].finish_reason == "stop"
    assert msg.content.startswith("<tool_response>")  # what the model wrote, as content, unchanged


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_tool_calls_after_tool_result_round_trips(server, stream):
    kw = dict(model=MODEL, messages=ROUND_TRIP, tools=TOOLS, max_tokens=80, temperature=0, logit_bias=NUDGE)
    if stream:
        text, finish, streamed = _stream_choices(server.client().chat.completions.create(stream=True, **kw))
        content, calls = text.get(0), [streamed.get(0, {})[i] for i in sorted(streamed.get(0, {}))]
        reason = finish[0]
    else:
        resp = server.client().chat.completions.create(**kw)
        msg, reason = resp.choices[0].message, resp.choices[0].finish_reason
        content = msg.content
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in msg.tool_calls or ()]
    assert reason == "tool_calls", (content, calls)
    _check_calls(calls, {"get_weather", "get_time"})
    assert "<tool_call>" not in (content or "")  # markup never leaks into content


def test_tool_choice_none_and_tool_results(server):
    resp = server.client().chat.completions.create(model=MODEL, messages=ROUND_TRIP, tools=TOOLS, tool_choice="none",
                                                   max_tokens=20, temperature=0)
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].finish_reason in ("stop", "length")
    # The tool result is in the prompt, rendered by the Hermes ChatML template: count its tokens.
    from transformers import AutoTokenizer

    from quantserve.server.api.tools import CHATML_TOOLS_TEMPLATE
    from quantserve.server.loading.default_model import default_model_folder

    tokenizer = AutoTokenizer.from_pretrained(default_model_folder())
    messages = [dict(m) for m in ROUND_TRIP]
    for m in messages:  # as transformers expects them: arguments as a mapping, content a string
        if m.get("tool_calls"):
            call = m["tool_calls"][0]
            m.update(content="", tool_calls=[{**call, "function": {
                "name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}}])
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, chat_template=CHATML_TOOLS_TEMPLATE,
                                         add_generation_prompt=True, tokenize=False)
    assert '<tool_response>\n{"temperature": 18}\n</tool_response>' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}' in text
    assert resp.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


# ------------------------------------------------------------------------------ refused before anything runs


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": ASK, "max_tokens": 8, **kw}


BAD = [
    (_chat(response_format=_response_format({"type": "objekt"})), "response_format", "objekt"),
    (_chat(response_format=_response_format({"type": "array", "uniqueItems": True})), "response_format",
     "uniqueItems"),
    (_chat(response_format=_response_format({"type": "string", "pattern": "(a"})), "response_format", "regex"),
    (_chat(response_format={"type": "json_schema"}), "response_format", "json_schema"),
    (_chat(response_format={"type": "xml"}), "response_format", None),
    (_chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), "structured_outputs", None),
    (_chat(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs", "exactly one"),
    (_chat(structured_outputs={"grammar": "root ::= ("}), "structured_outputs", "grammar"),
    (_chat(structured_outputs={"whitespace_pattern": " "}), "structured_outputs.whitespace_pattern", None),
    (_chat(response_format={"type": "json_object"}, stop=["}"]), "stop", None),
    (_chat(logit_bias={"49152": 1}), "logit_bias", None),
    (_chat(logit_bias={"5": 101}), "logit_bias", None),
    (_chat(logit_bias={"five": 1}), "logit_bias", None),
    (_chat(min_tokens=9), "min_tokens", None),
    (_chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "launch_rocket"}}), "tool_choice",
     "launch_rocket"),
    (_chat(tool_choice="required"), "tool_choice", None),
    (_chat(tools=TOOLS + TOOLS[:1]), "tools", "unique"),
    (_chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools", None),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
           tool_choice="required"), "tools", "objekt"),
    (_chat(tools=TOOLS, response_format={"type": "json_object"}), "response_format", "tool_choice"),
    (_chat(messages=[{"role": "tool", "content": "x"}]), "messages", "tool_call_id"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bad_structured_and_tool_requests_are_400s(server, stream):
    for body, param, words in BAD:
        r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                       json={**body, "stream": stream})
        # Refused before the stream starts: a JSON error, never an SSE body.
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] and err["param"].startswith(param), (body, err)
        if words:
            assert words in err["message"], (body, err)
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(), timeout=60,
                   json={"model": MODEL, "prompt": "hi", "n": 1, "best_of": 2, "stream": stream})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
