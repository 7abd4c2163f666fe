"""LoRA adapters through a real `quantserve serve` process and the official openai client:
--lora-modules, /v1/models (parent/root), "model": NAME picks the adapter (outputs equal peft's
unmerged LoRA on transformers over the same NF4 weights), /v1/load_lora_adapter and
/v1/unload_lora_adapter under traffic, their errors, the API key, and adapters refused at startup."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pydantic
import pytest
import torch

from .engine.helpers import make_prompts
from .lora_helpers import check_greedy
from .serving import run_serve, start_server

MODEL = "SmolLM2-135M-Instruct"
N = 12  # as tests/server/engine/test_lora.py: peft's outputs are computed once per session


@pytest.fixture(scope="module")
def adapters(lora_adapters):
    return lora_adapters  # tests/server/conftest.py


@pytest.fixture(scope="module")
def server(default_model_dir, adapters):
    # float32 KV cache: outputs compared with peft's on transformers (float32 cache)
    with start_server("--matmul-precision", "highest", "--kv-cache-dtype", "float32", "--max-lora-rank", "8",
                        "--max-loras", "2", "--max-cpu-loras", "4",
                        "--enable-lora-runtime-load", "--lora-root", str(adapters["attn"].parent),
                        "--lora-modules", f"a1={adapters['attn']}", f"a2={adapters['mlp']}") as srv:
        yield srv


@pytest.fixture(scope="module")
def prompt_ids(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    return tokenizer, make_prompts(tokenizer, 1)[0]  # the engine tests' chat prompt, as token ids


def _check(default_model_dir, tokenizer, adapter, prompt, choice) -> str:
    """The answer's tokens (its text re-encoded) are peft's greedy continuation of the prompt."""
    torch.set_float32_matmul_precision("highest")  # as the server above
    ids = tokenizer.encode(choice.text, add_special_tokens=False)
    assert tokenizer.decode(ids) == choice.text
    assert len(check_greedy(default_model_dir, adapter, prompt, ids)) <= 1
    return choice.text


def test_models_list_adapters_with_parent_and_root(server, adapters):
    cards = {m.id: m for m in server.client().models.list().data}
    assert set(cards) == {MODEL, "a1", "a2"}
    for name in ("a1", "a2"):
        card = cards[name].model_dump()
        assert card["parent"] == MODEL and card["root"] == name  # no server path in a public listing
    assert server.client().models.retrieve("a2").model_dump()["parent"] == MODEL


def test_model_name_picks_the_adapter(server, adapters, default_model_dir, prompt_ids):
    tokenizer, prompt = prompt_ids
    client = server.client()
    texts = {}
    for model, adapter in ((MODEL, None), ("a1", adapters["attn"]), ("a2", adapters["mlp"])):
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0)
        assert resp.model == model
        texts[model] = _check(default_model_dir, tokenizer, adapter, prompt, resp.choices[0])
    assert texts["a1"] != texts[MODEL] or texts["a2"] != texts[MODEL]
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "a1" and chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt=prompt, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


def test_load_and_unload_under_traffic(server, adapters, default_model_dir, prompt_ids):
    tokenizer, prompt = prompt_ids
    url, headers = server.url, server.headers()

    async def stream(client, model, n):
        text, finish = "", None
        async for chunk in await client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                                           stream=True, extra_body={"ignore_eos": True}):
            text += chunk.choices[0].text if chunk.choices else ""
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        return text, finish

    expected = {}  # each model's first N tokens, checked against peft
    for model, adapter in ((MODEL, None), ("a1", adapters["attn"]), ("a2", adapters["mlp"])):
        resp = server.client().completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0)
        expected[model] = _check(default_model_dir, tokenizer, adapter, prompt, resp.choices[0])

    async def go():
        client = server.async_client()
        async with httpx.AsyncClient(timeout=300) as http:
            traffic = [asyncio.ensure_future(stream(client, m, 40)) for m in (MODEL, "a1", "a1", "a2")]
            await asyncio.sleep(0.5)
            r = await http.post(url + "/v1/load_lora_adapter", headers=headers,
                                json={"lora_name": "a3", "lora_path": str(adapters["mlp"])})
            assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a3' added successfully.", r.text
            loaded = await client.completions.create(model="a3", prompt=prompt, max_tokens=N, temperature=0)
            r = await http.post(url + "/v1/unload_lora_adapter", headers=headers, json={"lora_name": "a1"})
            assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a1' removed successfully.", r.text
            done = await asyncio.gather(*traffic)
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="a1", prompt=prompt, max_tokens=2)
            return loaded, done

    loaded, done = asyncio.run(asyncio.wait_for(go(), 600))
    assert loaded.choices[0].text == _check(default_model_dir, tokenizer, adapters["mlp"], prompt, loaded.choices[0])
    assert loaded.choices[0].text == expected["a2"]  # the same weights under another name
    # the requests in flight on the unloaded adapter finished with it (all 40 tokens, the first N
    # as checked above), as did the others
    for (text, finish), model in zip(done, (MODEL, "a1", "a1", "a2")):
        assert finish == "length"
        assert text.startswith(expected[model]), model
    assert done[1] == done[2]
    assert {m.id for m in server.client().models.list().data} == {MODEL, "a2", "a3"}


def test_adapter_endpoint_errors(server, adapters, tmp_path):
    url, headers = server.url, server.headers()

    def post(path, body, auth=True):
        return httpx.post(url + path, headers=headers if auth else {}, json=body, timeout=120)

    r = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapters["attn"])}, auth=False)
    assert r.status_code == 401
    r = post("/v1/unload_lora_adapter", {"lora_name": "a2"}, auth=False)
    assert r.status_code == 401
    r = post("/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": str(adapters["attn"])})
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(adapters["big"])})
    assert r.status_code == 400 and "rank 16" in r.json()["error"]["message"] and "--max-lora-rank 8" in r.text
    r = post("/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": str(tmp_path / "nowhere")})
    assert r.status_code == 404 and "not an adapter folder inside" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": str(adapters["attn"])})
    assert r.status_code == 400
    r = post("/v1/load_lora_adapter", {"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = post("/v1/unload_lora_adapter", {"lora_name": "never"})
    assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
    # nothing else was affected
    assert {m.id for m in server.client().models.list().data} >= {MODEL, "a2"}
    assert httpx.get(url + "/health").status_code == 200


def test_bad_adapter_at_startup_exits_with_its_reason(default_model_dir, tmp_path, adapters):
    bad = start_server("--lora-modules", f"good={adapters['attn']}", f"bad={tmp_path / 'missing'}")
    try:
        code = bad.wait(timeout=600)
    finally:
        bad.kill()
    assert code == 1, bad.log_tail()
    assert f"quantserve serve: error: LoRA adapter 'bad': no folder {tmp_path / 'missing'}" in bad.last_log_line()
    malformed = run_serve("--lora-modules", "just-a-name", timeout=120)
    assert malformed.returncode == 2 and "is not NAME=PATH" in malformed.stderr


def test_lora_modules_flag_forms():
    from quantserve.server.config import Settings

    s = Settings(lora_modules=["a=/x/a", '{"name": "b", "path": "/x/b", "base_model_name": "m"}'])
    assert s.lora_pairs() == [("a", "/x/a"), ("b", "/x/b")]  # vLLM's two forms
    for bad, why in ((["a"], "is not NAME=PATH"), (["=/x"], "is not NAME=PATH"), (["a=/x", "a=/y"], "given twice"),
                     (['{"name": "c"}'], "is not NAME=PATH"), (["{not json"], "is not valid JSON")):
        with pytest.raises(pydantic.ValidationError, match=why):
            Settings(lora_modules=bad)


def test_memory_reports_the_adapters(server, adapters):
    """/v1/memory counts the loaded adapters' bytes: every A and B element of their files, once (the
    server runs at "highest" precision, so they are kept in float32: 4 bytes an element). Its own
    adapter, loaded and unloaded here: the other tests load and unload theirs."""
    from safetensors import safe_open

    def elements(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())

    def report():
        body = httpx.get(f"{server.url}/v1/memory", headers=server.headers(), timeout=30).json()
        return body["models"][0].get("lora_adapters", {"by_name": {}})

    load = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=server.headers(), timeout=60,
                      json={"lora_name": "mem", "lora_path": str(adapters["all"])})
    assert load.status_code == 200, load.text
    try:
        held = report()
        assert held["dtype"] == "float32"
        assert held["by_name"]["mem"] == 4 * elements(adapters["all"])
        assert held["bytes"] == sum(held["by_name"].values()) and held["count"] == len(held["by_name"])
    finally:
        assert httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=server.headers(), timeout=60,
                          json={"lora_name": "mem"}).status_code == 200
    assert "mem" not in report()["by_name"]
