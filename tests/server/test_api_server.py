"""End to end: a real `quantserve serve` process (uvicorn on a free port, the built-in default model,
NF4) driven by the official openai client; every response validated against the OpenAI types."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai.types import Completion as OAICompletion
from openai.types.chat import ChatCompletion as OAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OAIChatCompletionChunk

from .serving import MODEL, QUESTION, start_server


@pytest.fixture(scope="module")
def server(default_model_dir):
    with start_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_health_models_and_loading_state(server):
    # The port opens before the model is loaded (seconds of loading and warm-up): /health said so.
    loading = server.loading_response
    assert loading is not None, "never saw /health answer 503 while loading"
    assert "loading" in loading.json()["error"]["message"] and loading.headers["Retry-After"]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL


def test_chat_completion_non_streaming(server, tokenizer):
    resp = server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    OAIChatCompletion.model_validate(resp.model_dump())
    assert resp.object == "chat.completion" and len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert resp.usage.prompt_tokens == len(prompt_ids)
    completion_ids = tokenizer.encode(choice.message.content, add_special_tokens=False)
    # The text re-encodes to the generated count (+1 when generation ended on the EOS token).
    assert resp.usage.completion_tokens in (len(completion_ids), len(completion_ids) + 1)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_streaming_shape_usage_and_done(server):
    raw = httpx.post(
        server.url + "/v1/chat/completions", headers=server.headers(), timeout=120,
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}},
    )
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in raw.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [OAIChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens >= 1 and text
    assert len({c.id for c in chunks}) == 1


def test_streaming_with_openai_client_equals_non_streaming(server):
    client = server.client()
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content


def test_completions_endpoint(server, tokenizer):
    client = server.client()
    resp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    OAICompletion.model_validate(resp.model_dump())
    assert resp.object == "text_completion" and resp.choices[0].text
    assert resp.usage.prompt_tokens == len(tokenizer.encode("The capital of France is"))
    # Two prompts x n=2 -> four choices, indexed 0..3.
    resp = client.completions.create(model=MODEL, prompt=["Hello", "One, two,"], max_tokens=4, n=2, temperature=0.8, seed=1)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True, temperature=0)
    pieces = list(stream)
    assert any(p.choices and p.choices[0].finish_reason for p in pieces)


def test_logprobs_and_stop(server):
    client = server.client()
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 3 and tok.logprob <= 0
        # greedy: the chosen token is the most likely one, the first of the alternatives (same logits)
        assert (tok.token, tok.logprob) == (tok.top_logprobs[0].token, tok.top_logprobs[0].logprob)
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob >= tok.top_logprobs[2].logprob
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0).choices[0].message.content
    word = full.split()[2]
    stopped = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert word not in stopped.choices[0].message.content
    assert full.startswith(stopped.choices[0].message.content)


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_concurrent_async_streams(server):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=16,
            temperature=0, stream=True,
        )
        text = ""
        async for chunk in stream:
            OAIChatCompletionChunk.model_validate(chunk.model_dump())
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text

    async def main():
        client = server.async_client()
        return await asyncio.gather(*(one(client, i) for i in range(8)))

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)
    # The same request alone gives the same text as inside the batch.
    alone = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to 3."}], max_tokens=16, temperature=0
    ).choices[0].message.content
    assert alone == texts[0]


def test_disconnect_mid_stream_frees_kv_blocks(server):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", headers=server.headers(),
                         json={"model": MODEL, "messages": QUESTION, "max_tokens": 400, "temperature": 0,
                               "ignore_eos": True, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break  # hang up mid-stream
    deadline = time.time() + 30
    while time.time() < deadline:
        if server.metric("vllm:num_requests_running") == 0 and server.metric("vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.2)
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric("vllm:kv_cache_usage_perc") == 0
    # and the server keeps serving
    assert server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).choices


def test_metrics_and_memory(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:num_preemptions_total", "quantserve_host_rss_bytes", "quantserve_model_weight_bytes"):
        assert name in text, name
    assert server.metric("vllm:generation_tokens_total") > 0
    for histogram in ("vllm:request_queue_time_seconds", "vllm:time_to_first_token_seconds",
                      "vllm:e2e_request_latency_seconds", "vllm:inter_token_latency_seconds"):
        assert server.metric(histogram + "_count") > 0, histogram
    assert server.metric("vllm:request_success_total") > 0
    mem = httpx.get(server.url + "/v1/memory", headers=server.headers()).json()
    model = mem["models"][0]
    assert model["weights"]["weight_bytes"] < model["weights"]["weight_bytes_16bit"]
    assert model["kv_cache"]["blocks_total"] > 0 and mem["host"]["rss_bytes"] > 0


def test_tokenize_detokenize(server, tokenizer):
    r = httpx.post(server.url + "/tokenize", headers=server.headers(), json={"model": MODEL, "prompt": "Hello world"})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    r = httpx.post(server.url + "/detokenize", headers=server.headers(), json={"model": MODEL, "tokens": body["tokens"]})
    assert r.json()["prompt"] == tokenizer.decode(body["tokens"])
    for generation_prompt in (True, False):  # messages through the chat template, as transformers renders them
        r = httpx.post(server.url + "/tokenize", headers=server.headers(),
                       json={"model": MODEL, "messages": QUESTION, "add_generation_prompt": generation_prompt})
        expected = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=generation_prompt, tokenize=True)
        assert r.json()["tokens"] == list(getattr(expected, "input_ids", expected))


BAD_REQUESTS = [
    ("not json", None, 400),
    ({"model": MODEL}, None, 400),  # no messages
    ({"model": MODEL, "messages": []}, "messages", 400),
    ({"model": MODEL, "messages": "hi"}, "messages", 400),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages", 400),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages", 400),
    ({"model": MODEL, "messages": QUESTION, "temperature": -1}, "temperature", 400),
    ({"model": MODEL, "messages": QUESTION, "temperature": "hot"}, "temperature", 400),
    ({"model": MODEL, "messages": QUESTION, "top_p": 1.5}, "top_p", 400),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": -5}, "max_tokens", 400),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 10**9}, "max_tokens", 400),
    ({"model": MODEL, "messages": QUESTION, "n": 10**6}, "n", 400),
    ({"model": MODEL, "messages": QUESTION, "top_logprobs": 5}, None, 400),
    ({"model": MODEL, "messages": QUESTION, "stop": [""]}, "stop", 400),
    ({"model": "no-such-model", "messages": QUESTION}, "model", 404),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 40000}]}, "messages", 400),
    # The engine's limits, checked once there, reported with the request's own field names.
    ({"model": MODEL, "messages": QUESTION, "max_completion_tokens": 10**9}, "max_completion_tokens", 400),
    ({"model": MODEL, "messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs", 400),
    ({"model": MODEL, "messages": QUESTION, "stop": [f"s{i}" for i in range(17)]}, "stop", 400),
    ({"model": MODEL, "messages": QUESTION, "stop": "x" * 257}, "stop", 400),
    # Fields this server does not implement are refused by name, never silently dropped; the
    # structured-output and tool fields it does implement are validated (more in test_structured.py).
    ({"model": MODEL, "messages": QUESTION, "tools": [{"type": "function"}]}, "tools", 400),
    ({"model": MODEL, "messages": QUESTION, "response_format": {"type": "json_object", "x": 1}}, "response_format",
     400),
    ({"model": MODEL, "messages": QUESTION, "logit_bias": {"50256": -101}}, "logit_bias", 400),
    ({"model": MODEL, "messages": QUESTION, "prediction": {"type": "content", "content": "x"}}, "prediction", 400),
    ({"model": MODEL, "messages": QUESTION, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x",
     400),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": []}]}, "messages", 400),
]


@pytest.mark.parametrize("body,param,status", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, body, param, status):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=60,
                   headers={**server.headers(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] and err["param"].startswith(param), err


def test_unsupported_fields_are_named(server):
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                   json={"model": MODEL, "messages": QUESTION, "audio": {"voice": "alloy"}, "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "audio" and err["code"] == "unsupported_parameter"
    assert "audio" in err["message"]
    # Fields with no effect on the output are accepted (and ignored).
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                   json={"model": MODEL, "messages": QUESTION, "max_tokens": 2, "user": "u1", "store": False,
                         "metadata": {"k": "v"}, "service_tier": "auto"})
    assert r.status_code == 200, r.text


COMPLETION_BAD = [
    ({"model": MODEL, "prompt": [1, 2, 10**6]}, "prompt"),  # token id past the vocabulary
    ({"model": MODEL, "prompt": [1, -2]}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": ["a"] * 9, "n": 2}, "n"),  # 18 choices > --max-n 16
    ({"model": MODEL, "prompt": "hi", "best_of": 2}, "best_of"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
]


@pytest.mark.parametrize("body,param", COMPLETION_BAD)
def test_bad_completion_requests(server, body, param):
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(), json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_concurrent_tokenization_is_exact(server, tokenizer):
    """Tokenizing runs on worker threads, detokenizing on the event loop: many at once must each give
    exactly what the tokenizer gives alone (a fast tokenizer shared unsafely fails or mixes them)."""
    texts = [f"{i} " + "lorem ipsum dolor sit amet " * (50 + i) for i in range(24)]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=120) as client:
            enc = await asyncio.gather(*(client.post("/tokenize", json={"model": MODEL, "prompt": t}) for t in texts))
            ids = [r.json()["tokens"] for r in enc]
            dec = await asyncio.gather(*(client.post("/detokenize", json={"model": MODEL, "tokens": i}) for i in ids))
            return ids, [r.json()["prompt"] for r in dec]

    ids, back = asyncio.run(main())
    assert ids == [tokenizer.encode(t) for t in texts]
    assert back == [tokenizer.decode(i) for i in ids]


def test_context_length_code_and_body_limits(server):
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 40000}]})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    huge = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (32 * 2**20) + b'"}]}'
    r = httpx.post(server.url + "/v1/chat/completions", content=huge, timeout=60,
                   headers={**server.headers(), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_auth(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # public
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_server_survives_the_battery(server):
    # After every bad request above the server still answers correctly.
    resp = server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in resp.choices[0].message.content


def test_overload_gets_429_with_retry_after_and_loses_nothing(default_model_dir):
    with start_server("--max-num-seqs", "1", "--max-queue", "2", api_key=None) as srv:
        async def one(client, i):
            try:
                r = await client.post("/v1/completions", json={"model": MODEL, "prompt": f"Number {i}:", "max_tokens": 24,
                                                               "temperature": 0, "ignore_eos": True})
                return r
            except httpx.HTTPError as exc:  # pragma: no cover - would be a lost request
                return exc

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
                return await asyncio.gather(*(one(client, i) for i in range(10)))

        results = asyncio.run(main())
        statuses = [r.status_code for r in results]
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
        # A batch of prompts is admitted whole or not at all: more prompts than the queue holds get 429.
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        for r in results:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["usage"]["completion_tokens"] == 24  # every accepted request completed whole
