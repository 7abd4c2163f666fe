"""Issue 25's battery of constrained requests, shared by tests/server/test_structured_finish.py and
bench/structured.py: each case sends one request with the official openai client at temperature 0
and judges the answer with json.loads + jsonschema. Unbounded schemas on purpose (the model can
run a string or a list to the budget's end): an answer must parse whatever max_tokens is.

    city:           client.chat.completions.parse(response_format=City)  (strict, a pydantic model)
    json_object:    response_format={"type": "json_object"}
    tools_required: tool_choice="required", parallel_tool_calls left at its default (true)
    tools_named:    tool_choice={"type": "function", "function": {"name": "get_weather"}}
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional

import jsonschema
from pydantic import BaseModel

MODEL = "SmolLM2-135M-Instruct"


class City(BaseModel):
    name: str
    country: str
    population: int
    landmarks: list[str]


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}


@dataclasses.dataclass
class Result:
    case: str
    max_tokens: int
    ok: bool
    finish_reason: Optional[str]
    completion_tokens: int
    seconds: float
    detail: str  # the content or the calls, or what was wrong


def _city(client: Any, max_tokens: int) -> tuple[Any, list[Any]]:
    import openai

    messages = [{"role": "user", "content": "Describe Paris: its name, country, population and landmarks."}]
    try:
        resp = client.chat.completions.parse(model=MODEL, messages=messages, response_format=City,
                                             max_tokens=max_tokens, temperature=0)
    except openai.LengthFinishReasonError as exc:  # the client refuses to parse "length"; we judge it anyway
        resp = exc.completion
    content = resp.choices[0].message.content
    value = json.loads(content)
    City.model_validate(value)
    jsonschema.validate(value, City.model_json_schema())
    return resp, [content]


def _json_object(client: Any, max_tokens: int) -> tuple[Any, list[Any]]:
    messages = [{"role": "user", "content": "Give facts about the population of Paris per inhabitant, as JSON."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, response_format={"type": "json_object"},
                                          max_tokens=max_tokens, temperature=0)
    content = resp.choices[0].message.content
    if not isinstance(json.loads(content), dict):
        raise ValueError("not an object")
    return resp, [content]


def _tools(choice: Any, exactly_one: bool) -> Callable[[Any, int], tuple[Any, list[Any]]]:
    def run(client: Any, max_tokens: int) -> tuple[Any, list[Any]]:
        messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
        resp = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=choice,
                                              max_tokens=max_tokens, temperature=0)
        calls = resp.choices[0].message.tool_calls or []
        if not calls:
            raise ValueError("no tool call")
        if exactly_one and len(calls) != 1:
            raise ValueError(f"{len(calls)} calls for a named tool_choice")
        names = [c.function.name for c in calls]
        if len(set(names)) != len(names):
            raise ValueError(f"repeated calls {names}")
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
        return resp, [f"{c.function.name}({c.function.arguments})" for c in calls]

    return run


BATTERY: dict[str, Callable[[Any, int], tuple[Any, list[Any]]]] = {
    "city": _city,
    "json_object": _json_object,
    "tools_required": _tools("required", exactly_one=False),
    "tools_named": _tools({"type": "function", "function": {"name": "get_weather"}}, exactly_one=True),
}


def run_case(client: Any, case: str, max_tokens: int) -> Result:
    """One request of the battery, judged."""
    start = time.perf_counter()
    try:
        resp, detail = BATTERY[case](client, max_tokens)
    except Exception as exc:  # noqa: BLE001 - the judge's verdict, reported
        return Result(case, max_tokens, False, None, 0, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return Result(case, max_tokens, True, resp.choices[0].finish_reason, resp.usage.completion_tokens,
                  time.perf_counter() - start, " ".join(detail)[:300])
