"""/v1/messages through the official anthropic SDK against a real server (the default model, NF4).

Oracles: the same conversation through /v1/chat/completions with the official openai client
(greedy, so both must be the same text), /tokenize for prompt sizes, jsonschema for tool inputs
and JSON outputs. The SDK itself checks every response and event against Anthropic's types.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from .apis_helpers import API_KEY, MODEL, api_server  # noqa: F401 - the fixture

GREEDY = {"temperature": 0}  # the SDK has no sampling arguments: raw fields go in extra_body
QUESTION = "What is the capital of France?"
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                            "required": ["city", "unit"], "additionalProperties": False}}


def _chat(server, messages: list[dict], **kw):
    return server.openai().chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def _chat_text(server, messages: list[dict], **kw) -> str:
    return _chat(server, messages, **kw).choices[0].message.content


def test_text_equals_chat_completions_and_stream_reassembles_it(api_server):
    client = api_server.anthropic()
    kw = dict(model=MODEL, max_tokens=24, system="You are a geography teacher.",
              messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY)
    message = client.messages.create(**kw)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"] and "Paris" in message.content[0].text
    expected = _chat(api_server, [{"role": "system", "content": "You are a geography teacher."},
                                  {"role": "user", "content": QUESTION}], max_tokens=24)
    assert message.content[0].text == expected.choices[0].message.content
    reason = {"length": "max_tokens", "stop": "end_turn"}[expected.choices[0].finish_reason]
    assert message.stop_reason == reason and message.usage.output_tokens == expected.usage.completion_tokens

    with client.messages.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == message.content[0].text and final.stop_reason == reason
    assert final.usage.output_tokens == message.usage.output_tokens
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert {"content_block_start", "content_block_stop", "message_delta"} <= set(events)


def test_system_blocks_and_usage_agree_with_count_tokens(api_server, default_model_dir):
    client = api_server.anthropic()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    as_blocks = client.messages.count_tokens(model=MODEL, messages=messages,
                                             system=[{"type": "text", "text": "Be brief."}]).input_tokens
    as_text = client.messages.count_tokens(model=MODEL, messages=messages, system="Be brief.").input_tokens
    # The oracle: the same conversation rendered by the chat template (/tokenize).
    tokenized = api_server.post("/tokenize", {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]}).json()["count"]
    assert as_blocks == as_text == tokenized
    message = client.messages.create(model=MODEL, max_tokens=4, messages=messages, system="Be brief.",
                                     extra_body=GREEDY)
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == tokenized  # prompt cache hits counted apart


def test_stop_sequence_is_named(api_server):
    client = api_server.anthropic()
    unstopped = _chat_text(api_server, [{"role": "user", "content": QUESTION}], max_tokens=24)
    assert " Paris" in unstopped
    message = client.messages.create(model=MODEL, max_tokens=24, messages=[{"role": "user", "content": QUESTION}],
                                     stop_sequences=[" Paris", "zzz"], extra_body=GREEDY)
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == " Paris"
    assert message.content[0].text == unstopped[: unstopped.index(" Paris")]
    with client.messages.stream(model=MODEL, max_tokens=24, messages=[{"role": "user", "content": QUESTION}],
                                stop_sequences=[" Paris"], extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == " Paris"


@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True},
                                    {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}])
def test_forced_tool_use_validates_and_streams_the_same(api_server, choice):
    client = api_server.anthropic()
    other = {"name": "get_time", "description": "Current time", "input_schema": {"type": "object", "properties": {}}}
    kw = dict(model=MODEL, max_tokens=80, messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
              tools=[WEATHER, other] if choice["type"] == "tool" else [WEATHER], tool_choice=choice, extra_body=GREEDY)
    message = client.messages.create(**kw)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == use.input and final.stop_reason == "tool_use"


def test_tool_result_round_trip(api_server):
    client = api_server.anthropic()
    messages = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call the tool.", "signature": "x"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "unit": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 degrees, rain"},
                                     {"type": "text", "text": "Summarize it."}]},
    ]
    counted = client.messages.count_tokens(model=MODEL, messages=messages, tools=[WEATHER]).input_tokens
    # The same turns in OpenAI's shape, rendered by /tokenize: the tool call and its result are in the prompt.
    text = api_server.post("/v1/chat/completions", {
        "model": MODEL, "max_tokens": 1, "tools": [{"type": "function", "function": {
            "name": WEATHER["name"], "description": WEATHER["description"], "parameters": WEATHER["input_schema"]}}],
        "tool_choice": "none", "messages": [
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "unit": "celsius"})}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "12 degrees, rain"},
            {"role": "user", "content": "Summarize it."}]}).json()
    assert counted == text["usage"]["prompt_tokens"]
    reply = client.messages.create(model=MODEL, max_tokens=16, messages=messages, tools=[WEATHER], extra_body=GREEDY)
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_json_schema_output(api_server):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    message = api_server.anthropic().messages.create(
        model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "Name a city and its country as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body=GREEDY)
    jsonschema.validate(json.loads(message.content[0].text), schema)


def test_bad_input_gets_anthropics_error_shape(api_server):
    client = api_server.anthropic()
    with pytest.raises(anthropic.BadRequestError) as info:  # max_tokens is required (the SDK's own client, raw)
        client.post("/v1/messages", body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                    cast_to=object)
    assert info.value.status_code == 400 and info.value.body["error"]["type"] == "invalid_request_error"
    r = api_server.post("/v1/messages", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
    for body, status, kind in [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "x": 1}]}]}, 400, "invalid_request_error"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
          "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "claude-nonexistent"}, 404, "not_found_error"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1.5}, 400, "invalid_request_error"),
        ({"messages": [{"role": "user", "content": "hi"}], "unknown_field": 1}, 400, "invalid_request_error"),
    ]:
        r = api_server.post("/v1/messages", {"model": MODEL, "max_tokens": 4, **body})
        assert r.status_code == status, r.text
        assert set(r.json()) == {"type", "error"} and r.json()["error"]["type"] == kind, r.text
    assert "nope" in api_server.post("/v1/messages", {"model": MODEL, "max_tokens": 4, "tools": [WEATHER], "messages": [
        {"role": "user", "content": "hi"}], "tool_choice": {"type": "tool", "name": "nope"}}).json()["error"]["message"]


def test_api_key_as_x_api_key_or_bearer(api_server):
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    url = api_server.url + "/v1/messages"
    assert httpx.post(url, json=body, headers={"x-api-key": API_KEY}, timeout=120).status_code == 200
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120).status_code == 200
    bad = httpx.post(url, json=body, headers={"x-api-key": "wrong"}, timeout=30)
    assert bad.status_code == 401 and bad.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": bad.json()["error"]["message"]}}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=api_server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    # OpenAI's routes keep OpenAI's shape, and take x-api-key too.
    r = httpx.get(api_server.url + "/v1/models", headers={"x-api-key": "wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(api_server.url + "/v1/models", headers={"x-api-key": API_KEY}, timeout=30).status_code == 200
