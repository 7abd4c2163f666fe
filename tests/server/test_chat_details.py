"""Chat completions as a real client sees them (issue 24): the role sent once, vLLM's
continuous_usage_stats, HEAD on /health and /v1/models, parallel_tool_calls: false."""

from __future__ import annotations

import json

import httpx

from .apis_helpers import MODEL, api_server  # noqa: F401 - the fixture

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _raw_chunks(server, **body) -> list[dict]:
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "stream": True, **body})
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_role_once_then_only_what_changed(api_server):
    chunks = _raw_chunks(api_server, max_tokens=8, temperature=0)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:]) and all(None not in d.values() for d in deltas)
    text = "".join(d.get("content", "") for d in deltas)
    whole = api_server.openai().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    assert text == whole.choices[0].message.content


def test_continuous_usage_stats(api_server):
    chunks = _raw_chunks(api_server, max_tokens=6, temperature=0,
                         stream_options={"include_usage": True, "continuous_usage_stats": True})
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    completions = [u["completion_tokens"] for u in usages]
    assert completions == sorted(completions) and completions[-1] == 6
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    plain = _raw_chunks(api_server, max_tokens=6, temperature=0, stream_options={"include_usage": True})
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 6


def test_head_on_health_and_models(api_server):
    assert httpx.head(api_server.url + "/health", timeout=10).status_code == 200
    headers = {"Authorization": f"Bearer {api_server.api_key}"}
    assert httpx.head(api_server.url + "/v1/models", headers=headers, timeout=10).status_code == 200
    assert httpx.head(api_server.url + f"/v1/models/{MODEL}", headers=headers, timeout=10).status_code == 200


def test_parallel_tool_calls_false_means_at_most_one_call(api_server):
    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        for n in ("get_weather", "get_time")]
    messages = [{"role": "user", "content": "Weather and time in Oslo, Paris and Rome?"}]
    out = api_server.openai().chat.completions.create(model=MODEL, messages=messages, tools=tools,
                                                      tool_choice="required", parallel_tool_calls=False,
                                                      max_tokens=120, temperature=0)
    assert len(out.choices[0].message.tool_calls) == 1 and out.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_when_read_as_written():
    # "auto" with a stop string is not constrained: the reader keeps the first call only.
    from quantserve.server.api.output import OutputReader, parse_whole
    from quantserve.server.api.tool_parsers import FORMATS
    from quantserve.server.api.tools import ToolContext

    text = ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    tools = ToolContext("auto", FORMATS["hermes"])
    assert [c["name"] for c in parse_whole(OutputReader(tools, None, True), text).calls] == ["a", "b"]
    assert [c["name"] for c in parse_whole(OutputReader(tools, None, False), text).calls] == ["a"]
