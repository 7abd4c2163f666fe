"""/v1/responses through the official openai SDK against a real server (the default model, NF4).

Oracles: the same conversation through /v1/chat/completions (greedy: the same text), its
prompt_tokens for what a previous_response_id chain puts in the prompt, jsonschema for call
arguments and JSON outputs; the SDK's stream helper checks the event sequence and item ids.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from quantserve.server.api.responses import ResponseStore

from .apis_helpers import MODEL, api_server  # noqa: F401 - the fixture

QUESTION = "What is the capital of France?"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}


def _chat(server, messages: list[dict], **kw):
    return server.openai().chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def test_text_equals_chat_completions(api_server):
    client = api_server.openai()
    r = client.responses.create(model=MODEL, input=QUESTION, instructions="Answer briefly.", max_output_tokens=24,
                                temperature=0)
    chat = _chat(api_server, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
                 max_tokens=24)
    assert r.object == "response" and r.output_text == chat.choices[0].message.content
    cut = chat.choices[0].finish_reason == "length"
    assert r.status == ("incomplete" if cut else "completed")
    assert (r.incomplete_details.reason if cut else r.incomplete_details) == ("max_output_tokens" if cut else None)
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert [item.type for item in r.output] == ["message"] and r.instructions == "Answer briefly."


def test_stream_events_in_order_and_reassembled(api_server):
    client = api_server.openai()
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=20, temperature=0)
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=20, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_function_call_validates_and_streams_the_same(api_server, choice):
    client = api_server.openai()
    other = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
    kw = dict(model=MODEL, input="What is the weather in Oslo?", tools=[WEATHER, other], tool_choice=choice,
              parallel_tool_calls=False, max_output_tokens=80, temperature=0)
    r = client.responses.create(**kw)
    calls = [item for item in r.output if item.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1
    if choice != "required":
        assert calls[0].name == "get_weather"
    schema = WEATHER["parameters"] if calls[0].name == "get_weather" else other["parameters"]
    jsonschema.validate(json.loads(calls[0].arguments), schema)
    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()
    (streamed,) = [item for item in final.output if item.type == "function_call"]
    assert (streamed.name, streamed.arguments) == (calls[0].name, calls[0].arguments)


def test_function_call_output_round_trip_and_previous_response_id(api_server):
    client = api_server.openai()
    first = client.responses.create(model=MODEL, input="What is the weather in Oslo?", tools=[WEATHER],
                                    tool_choice="required", parallel_tool_calls=False, max_output_tokens=80,
                                    temperature=0)
    (call,) = [item for item in first.output if item.type == "function_call"]
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=16, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12 degrees, rain"}])
    # The oracle: the whole conversation sent at once, in OpenAI's chat shape.
    chat = _chat(api_server, [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
            "name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "12 degrees, rain"}],
        tools=[{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}],
        max_tokens=16)
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == (chat.choices[0].message.content or "")
    assert second.previous_response_id == first.id
    # The same items sent by hand (no store) make the same prompt.
    by_hand = client.responses.create(
        model=MODEL, tools=[WEATHER], max_output_tokens=1, store=False, input=[
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "12 degrees, rain"}])
    assert by_hand.usage.input_tokens == second.usage.input_tokens


def test_store_get_delete(api_server):
    client = api_server.openai()
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, temperature=0)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    deleted = client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=MODEL, input="Hi", previous_response_id=r.id, max_output_tokens=2)
    assert info.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_store_is_bounded_in_count_and_bytes():
    store = ResponseStore(max_count=2, max_bytes=10_000)
    for i in range(3):
        assert store.put({"id": f"r{i}", "output": []}, [{"type": "message", "role": "user", "content": "x"}])
    assert store.get("r0") is None and store.get("r1") is not None and store.evicted == 1
    store.get("r1")  # used: now the newest
    store.put({"id": "r3"}, [])
    assert store.get("r2") is None and store.get("r1") is not None
    small = ResponseStore(max_count=100, max_bytes=300)
    for i in range(5):
        small.put({"id": f"s{i}", "pad": "y" * 80}, [])
    kept = [i for i in range(5) if small.get(f"s{i}") is not None]
    assert kept == [3, 4]  # three ~100-byte responses do not fit in 300 bytes: the oldest went first
    assert not small.put({"id": "huge", "pad": "z" * 400}, []) and small.get("huge") is None


def test_json_schema_text_format(api_server):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    r = api_server.openai().responses.create(
        model=MODEL, input="Name a city and its country as JSON.", max_output_tokens=100, temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    assert r.status == "completed", r.output_text
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_bad_input_gets_openais_error_shape(api_server):
    for body, param in [
        ({"input": [{"type": "computer_call", "id": "x"}]}, "input"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, None),
        ({"input": []}, "input"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "unknown": 1}, "unknown"),
    ]:
        r = api_server.post("/v1/responses", {"model": MODEL, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(r.json()) == {"error"} and error["type"] == "invalid_request_error", r.text
        if param is not None:
            assert error["param"].split(".")[0] == param, r.text
    assert api_server.post("/v1/responses", {"model": "nope", "input": "hi"}).status_code == 404
