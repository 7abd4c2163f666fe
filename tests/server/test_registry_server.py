"""The model registry through real `quantserve serve` processes: a --models-dir of the default model,
three small random-weight models of other families and a broken folder, plus a --models-config
entry too big for the memory budget. On-demand loads (one load for concurrent first requests),
least-recently-used eviction of idle models only, keep_alive, the error state of a broken model
while the others serve, a clear 507 for a model over the budget, the load/unload endpoints behind
the API key, and each model's greedy text equal to a one-model server's on the same folder."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import httpx
import pytest
import torch

from .engine import family_models as fm
from .serving import start_server

TINY = ("qwen3", "llama3", "mistral")
PROMPT = "The three primary colours are"
# One compute thread everywhere: a greedy token of a random model can hang on a near-tie that a
# different summation order (another thread count) would flip.
ONE_THREAD = ("--cpu-threads", "1")


def _save_tiny(family: str, folder, tokenizer) -> None:
    import transformers

    cls_name, values = fm.FAMILIES[family]
    values = {**fm.COMMON, **values, "vocab_size": len(tokenizer), "hidden_size": 64}
    torch.manual_seed(len(family))
    transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**values)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def models_dir(default_model_dir, tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("models")
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    for family in TINY:
        _save_tiny(family, root / family, tokenizer)
    os.symlink(default_model_dir, root / "smol")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    config = tmp_path_factory.mktemp("models-config") / "models.yaml"
    # "huge": the default model with a KV cache bigger than the whole budget below
    config.write_text(f"huge:\n  model: {default_model_dir}\n  kv-cache-memory: 1.0\n")
    return root, config


@pytest.fixture(scope="module")
def server(models_dir):
    root, config = models_dir
    with start_server("--models-dir", str(root), "--models-config", str(config), "--models-max", "2",
                      "--models-memory", "0.75", "--kv-cache-memory", "0.05", *ONE_THREAD) as srv:
        yield srv


def _http(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.headers(), timeout=120)


def _states(server) -> dict[str, str]:
    with _http(server) as http:
        return {m["id"]: m["state"] for m in http.get("/v1/models").json()["data"] if m.get("parent") is None}


def _complete(server, model: str, max_tokens: int = 8, **extra) -> httpx.Response:
    with _http(server) as http:
        return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                  "temperature": 0, **extra})


def _loads(server, model: str) -> float:
    return _metric(server, "quantserve_model_loads_total", model)


def _metric(server, name: str, model: str) -> float:
    with _http(server) as http:
        text = http.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model_name="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_state(server, model: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _states(server).get(model) != state:
        assert time.monotonic() < deadline, f"{model} never became {state}: {_states(server)}"
        time.sleep(0.1)


def test_listing_knows_every_model_before_any_loads(server):
    """/v1/models (OpenAI's listing with each model's state) and /models (llama-server's router
    shape) both name every folder of the models dir and the config's entry, nothing loaded yet."""
    assert _states(server) == {n: "unloaded" for n in ("broken", "huge", "llama3", "mistral", "qwen3", "smol")}
    with _http(server) as http:
        routed = http.get("/models").json()["data"]
        health = http.get("/health")
    assert {m["id"]: m["status"]["value"] for m in routed} == {n: "unloaded" for n in _states(server)}
    assert health.status_code == 200  # nothing to load at startup: serving at once


def test_on_demand_load_one_load_for_concurrent_first_requests(server):
    """Four requests at once for an unloaded model: all answered, by one load."""
    assert _states(server)["llama3"] == "unloaded"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _complete(server, "llama3"), range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    texts = {a.json()["choices"][0]["text"] for a in answers}
    assert len(texts) == 1  # greedy: the same text four times
    assert _loads(server, "llama3") == 1
    assert _states(server)["llama3"] == "loaded"
    with _http(server) as http:
        card = http.get("/v1/models/llama3").json()
    assert card["memory"]["weight_bytes"] > 0 and card["memory"]["estimated"] is False


def test_least_recently_used_idle_model_is_evicted(server):
    """--models-max 2: loading a third model unloads the one used longest ago."""
    for model in ("qwen3", "llama3", "qwen3"):  # llama3 is now the least recently used
        assert _complete(server, model).status_code == 200
    assert _complete(server, "mistral").status_code == 200
    states = _states(server)
    assert (states["qwen3"], states["mistral"], states["llama3"]) == ("loaded", "loaded", "unloaded")


def test_a_model_with_requests_in_flight_is_never_evicted(server):
    """Both loaded models stream: a third model cannot be loaded now (503 + Retry-After naming
    why), and both streams finish whole; once one is idle, the third loads in its place."""
    for model in ("qwen3", "mistral"):
        assert _complete(server, model, max_tokens=1).status_code == 200
    started = threading.Barrier(3)
    finished: dict[str, dict] = {}

    def stream(model: str) -> None:
        with _http(server) as http, http.stream("POST", "/v1/completions", json={
                "model": model, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            started.wait()
            usage = None
            for line in lines:
                if line.startswith("data: {"):
                    import json

                    usage = json.loads(line[6:]).get("usage") or usage
            finished[model] = {"first": first, "usage": usage}

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("qwen3", "mistral")]
    for t in threads:
        t.start()
    started.wait()
    refused = _complete(server, "llama3")
    for t in threads:
        t.join()
    assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
    assert "in flight" in refused.json()["error"]["message"]
    assert {m: f["usage"]["completion_tokens"] for m, f in finished.items()} == {"qwen3": 1000, "mistral": 1000}
    assert _states(server)["llama3"] == "unloaded"
    assert _complete(server, "llama3").status_code == 200  # now an idle one makes room


def test_a_broken_model_is_an_error_and_the_others_serve(server):
    answer = _complete(server, "broken")
    assert answer.status_code == 503
    assert "config.json" in answer.json()["error"]["message"]
    with _http(server) as http:
        card = http.get("/v1/models/broken").json()
        routed = {m["id"]: m for m in http.get("/models").json()["data"]}
    assert card["state"] == "error" and "config.json" in card["error"]
    assert routed["broken"]["status"]["failed"] is True
    assert _complete(server, "qwen3").status_code == 200


def test_a_model_over_the_memory_budget_is_refused_with_the_numbers(server):
    """507 naming what the model needs and the budget; nothing loaded is unloaded for it."""
    before = _states(server)
    answer = _complete(server, "huge")
    assert answer.status_code == 507, answer.text
    message = answer.json()["error"]["message"]
    assert "huge" in message and "0.75 GiB" in message and "KV cache 1.00 GiB" in message
    assert _states(server) == {**before, "huge": "unloaded"}


def test_keep_alive_zero_unloads_when_idle_and_a_duration_expires(server):
    assert _complete(server, "qwen3", keep_alive=0).status_code == 200
    _wait_state(server, "qwen3", "unloaded", timeout=10)
    assert _complete(server, "qwen3", keep_alive="1s").status_code == 200
    assert _states(server)["qwen3"] == "loaded"
    _wait_state(server, "qwen3", "unloaded", timeout=10)
    assert _complete(server, "qwen3", keep_alive="abc").status_code == 400  # not a duration


def test_load_and_unload_endpoints_need_the_key(server):
    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        for path in ("/models/load", "/models/unload"):
            assert anonymous.post(path, json={"model": "llama3"}).status_code == 401
    with _http(server) as http:
        loaded = http.post("/models/load", json={"model": "llama3"})
        assert loaded.status_code == 200 and loaded.json()["model"]["status"]["value"] == "loaded"
        names = [m["model"] for m in http.get("/v1/memory").json()["models"]]
        assert "llama3" in names
        unloaded = http.post("/models/unload", json={"model": "llama3"})
        assert unloaded.status_code == 200 and unloaded.json()["model"]["status"]["value"] == "unloaded"
        assert "llama3" not in [m["model"] for m in http.get("/v1/memory").json()["models"]]
        assert http.post("/models/load", json={"model": "nope"}).status_code == 404
        assert http.post("/models/unload", json={}).status_code == 400


def test_unloading_a_busy_model_is_refused(server):
    assert _complete(server, "mistral", max_tokens=1).status_code == 200
    done = threading.Event()

    def long() -> None:
        _complete(server, "mistral", max_tokens=150, ignore_eos=True)
        done.set()

    thread = threading.Thread(target=long)
    thread.start()
    deadline = time.monotonic() + 20
    with _http(server) as http:
        while _metric(server, "vllm:num_requests_running", "mistral") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        busy = http.post("/models/unload", json={"model": "mistral"})
    thread.join()
    assert done.is_set()
    assert busy.status_code == 409 and "in flight" in busy.json()["error"]["message"]


# smol (the default model, 16 s for its own one-model server) with -m slow; qwen3 in every run.
@pytest.mark.parametrize("model", ["qwen3", pytest.param("smol", marks=pytest.mark.slow)])
def test_greedy_text_equals_a_one_model_server(server, models_dir, model):
    root, _ = models_dir
    with start_server(str(root / model), "--kv-cache-memory", "0.05", *ONE_THREAD) as single:
        expected = _complete(single, str(root / model), max_tokens=16).json()["choices"][0]["text"]
        if model == "qwen3":  # a one-model server whose model is unloaded stays up and loads it again
            with _http(single) as http:
                assert http.post("/models/unload", json={"model": str(root / model)}).status_code == 200
                assert http.get("/health").status_code == 200
            again = _complete(single, str(root / model), max_tokens=16).json()["choices"][0]["text"]
            assert again == expected and _loads(single, str(root / model)) == 2
    got = _complete(server, model, max_tokens=16).json()["choices"][0]["text"]
    assert got == expected and got
