"""The web console (GET /) in a real headless browser: Debian's chromium driven by playwright,
against a real `quantserve serve` process on the built-in default model with an API key.

The oracles are outside the page: the official openai client (the greedy reply the page streamed),
httpx (the server's own 401 message, /v1/memory and the quantization report the page renders), the
browser's own console and network log (no errors, no request leaving the server's origin), and the
pixels of the chart's canvas."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time

import httpx
import pytest

from quantserve.server.testing import ServerProcess

from .serving import API_KEY, MODEL, start_server

CHROMIUM = os.environ.get("QUANTSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    # CI installs it (scripts/setup.sh, as root): there a missing browser is a failure, not a skip.
    if os.environ.get("CI"):
        raise RuntimeError("chromium is missing: scripts/setup.sh installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")

WAIT_MS = 180_000  # generous: the CI machine has 2 cores, and other tests may share them


@pytest.fixture(scope="module")
def server(default_model_dir):
    with start_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # Root (CI) needs --no-sandbox; playwright's own browser builds are never downloaded.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=60_000)
        yield b
        b.close()


class Page:
    """A fresh browser context (its own sessionStorage) on the console, recording what the
    browser's console said and every request the page made."""

    def __init__(self, browser, server: ServerProcess, key: str | None) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        if key is not None:  # a user who already gave the key in this tab
            self.context.add_init_script(f"sessionStorage.setItem('quantserve.apiKey', {json.dumps(key)})")
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.requests: list = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"{m.text} ({m.location})"))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r))
        self.response = self.page.goto(server.url + "/")

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def wait(self, expression: str) -> None:
        # As a function, not a bare expression: playwright evaluates an expression with eval(),
        # which the page's Content-Security-Policy (kept on in these tests) forbids.
        self.page.wait_for_function(f"() => ({expression})", polling=100)

    def chart(self, name: str) -> list[list]:
        """The chart's samples, one list of [seconds, value] per series."""
        return self.js(f"window.quantserveConsole.live.charts.{name}.series.map((s) => s.points)")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser, server):
    pages: list[Page] = []

    def _open(key: str | None = API_KEY) -> Page:
        pages.append(Page(browser, server, key))
        return pages[-1]

    yield _open
    for p in pages:
        p.close()


def _ready(page: Page) -> None:
    page.wait("document.querySelector('#model').options.length > 0")


def test_page_loads_offline_without_console_errors(open_page, server):
    page = open_page()
    assert page.response.status == 200 and page.response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.response.headers["content-security-policy"]
    _ready(page)
    assert page.js("document.querySelector('#model').value") == MODEL
    # Two polls make the first rate; the memory panel and the report come from the API.
    page.wait("window.quantserveConsole.live.charts.tokens.updates >= 3")
    page.wait("document.querySelectorAll('#quant-body tbody tr').length > 0")

    report = httpx.get(f"{server.url}/v1/models/{MODEL}/quantization", headers=server.headers(), timeout=30)
    assert report.status_code == 200
    layers = report.json()["layers"]
    shown = page.js("[...document.querySelectorAll('#quant-body tbody tr')].map((r) => r.cells[0].textContent)")
    assert shown == [layer["name"] for layer in layers]
    memory = httpx.get(server.url + "/v1/memory", headers=server.headers(), timeout=30).json()
    weights = memory["models"][0]["weights"]["weight_bytes"]
    assert f"weights {weights / 2**20:.1f} MiB" in page.js("document.querySelector('#memory').textContent")

    assert page.errors == []
    # Offline: every request stayed on the server's origin (no CDN, no fonts, no analytics).
    assert page.requests and all(r.url.startswith(server.url + "/") or r.url.startswith("data:")
                                 for r in page.requests), [r.url for r in page.requests]
    # Every API call carried the key from sessionStorage.
    api_calls = [r for r in page.requests if r.url.startswith(server.url + "/v1/")]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {API_KEY}" for r in api_calls)


def test_memory_panel_on_a_gpu_splits_the_device_and_keeps_the_host(open_page, server):
    """A CPU machine cannot show the GPU branch for real: the server's own /v1/memory answer, with
    one device entry added as a CUDA server reports it, is handed to the page instead."""
    memory = httpx.get(server.url + "/v1/memory", headers=server.headers(), timeout=30).json()
    gib = 2**30
    memory["devices"] = [{"device": "cuda:0", "name": "NVIDIA H200", "total_bytes": 140 * gib,
                          "free_bytes": 100 * gib, "allocated_bytes": 30 * gib, "reserved_bytes": 32 * gib,
                          "peak_allocated_bytes": 31 * gib}]
    weights = memory["models"][0]["weights"]["weight_bytes"]
    kv_total = memory["models"][0]["kv_cache"]["bytes_total"]
    page = open_page()
    page.page.route("**/v1/memory", lambda route: route.fulfill(json=memory))
    _ready(page)
    page.wait("document.querySelectorAll('#memory .membar').length == 2")
    titles = page.js("[...document.querySelectorAll('#memory .membar-title')].map((t) => t.textContent)")
    assert titles[0].startswith("cuda:0 NVIDIA H200: 140.0 GiB total, 100.0 GiB free, 31.0 GiB peak allocated")
    assert titles[1].startswith("host RSS:")
    legend = page.js("document.querySelector('#memory .membar-legend').textContent")
    rest = (30 * gib - weights - kv_total) / gib
    assert f"weights {weights / 2**20:.1f} MiB" in legend and f"activations, workspace {rest:.1f} GiB" in legend
    assert page.errors == []


def test_chat_streams_the_greedy_reply_the_openai_client_gets(open_page, server):
    page = open_page()
    _ready(page)
    question = "What is the capital of France?"
    # Every change of the reply's text, as the page makes it.
    page.js("""() => {
        window.snapshots = [];
        new MutationObserver(() => {
            const last = [...document.querySelectorAll('.msg.assistant .text')].pop();
            const text = last ? last.textContent : '';
            if (window.snapshots[window.snapshots.length - 1] !== text) window.snapshots.push(text);
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.page.fill("#temperature", "0")
    page.page.fill("#max-tokens", "12")
    page.page.fill("#prompt", question)
    with page.page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.page.press("#prompt", "Enter")
    body = sent.value.post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 12 and body["model"] == MODEL
    page.page.wait_for_selector(".msg.assistant[data-done=true]")
    final = page.js("document.querySelector('.msg.assistant .text').textContent")
    snapshots = [s for s in page.js("window.snapshots") if s]

    expected = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, top_p=1, max_tokens=12)
    assert final == expected.choices[0].message.content and "Paris" in final
    # It arrived in pieces, each one extending the last.
    assert len(snapshots) >= 3, snapshots
    assert snapshots[-1] == final
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(snapshots)), snapshots
    assert "finish: length" in page.js("document.querySelector('.msg.assistant .stats').textContent")
    assert page.errors == []


def test_json_mode_sends_response_format_and_the_reply_is_json(open_page):
    page = open_page()
    _ready(page)
    page.page.check("#json-mode")
    page.page.fill("#temperature", "0")
    page.page.fill("#max-tokens", "3")
    page.page.fill("#prompt", "Name a color.")
    with page.page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.page.click("#send")
    assert sent.value.post_data_json["response_format"] == {"type": "json_object"}
    page.page.wait_for_selector(".msg.assistant[data-done=true]")
    # Three tokens of a JSON object: it opens with a brace (the model unconstrained starts with words).
    assert page.js("document.querySelector('.msg.assistant .text').textContent").lstrip().startswith("{")
    assert page.errors == []


def test_stop_aborts_the_stream_and_the_server_frees_it(open_page, server):
    page = open_page()
    _ready(page)
    page.page.fill("#max-tokens", "400")
    page.page.fill("#prompt", "Tell me a long story about a lighthouse.")
    page.page.click("#send")
    page.wait("(document.querySelector('.msg.assistant .text') || {}).textContent?.length > 0")
    page.page.click("#stop")
    page.page.wait_for_selector(".msg.assistant[data-done=true]")
    assert "finish: stopped" in page.js("document.querySelector('.msg.assistant .stats').textContent")
    assert page.page.is_enabled("#send") and page.page.is_disabled("#stop")
    # The server saw the client go: nothing left running, no KV block held (its own /metrics).
    deadline = time.time() + 60
    while server.metric("vllm:num_requests_running") or server.metric("vllm:kv_cache_usage_perc"):
        assert time.time() < deadline, "the stopped request still holds the engine"
        time.sleep(0.2)
    assert page.errors == []


def test_charts_follow_load_and_polling_stops_when_hidden(open_page, server):
    page = open_page()
    _ready(page)
    page.wait("window.quantserveConsole.live.charts.tokens.updates >= 2")
    before = page.js("document.querySelector('#chart-tokens').toDataURL()")
    start = page.chart("tokens")[0][-1][0]  # the last sample before the load
    usages: list = []

    def one(i: int) -> None:
        # Long enough (several seconds, EOS ignored) for the 1 s polls to see the requests running
        # on a fast idle machine too: with 16 tokens CI's run finished between two polls.
        reply = server.client().completions.create(model=MODEL, prompt=f"Count from {i} to fifty:", max_tokens=160,
                                                   temperature=0, extra_body={"ignore_eos": True})
        usages.append(reply.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        # While it runs: tokens/s above zero, requests running, KV blocks in use.
        page.wait("window.quantserveConsole.live.charts.tokens.series[0].points.some((p) => p[1] > 0)")
        page.wait("window.quantserveConsole.live.charts.requests.series[0].points.some((p) => p[1] >= 1)")
        page.wait("window.quantserveConsole.live.charts.kv.series[0].points.some((p) => p[1] > 0)")
    finally:
        for t in threads:
            t.join()
    assert len(usages) == 3
    # Two more polls: one under way may have scraped before the last token.
    polls = page.js("window.quantserveConsole.live.charts.tokens.updates")
    page.wait(f"window.quantserveConsole.live.charts.tokens.updates >= {polls + 2}")
    # Finished requests brought latency samples (TTFT and inter-token, in ms).
    page.wait("window.quantserveConsole.live.charts.latency.series.every((s) => s.points.some((p) => p[1] > 0))")
    assert page.js("document.querySelector('#chart-tokens').toDataURL()") != before
    # The tokens/s line, integrated over the seconds since the load began, is the tokens the
    # openai client was told it got: no poll lost or counted twice.
    points = page.chart("tokens")[0]
    after = [i for i, (t, _) in enumerate(points) if t > start]
    assert after and after[0] >= 1
    generated = sum(points[i][1] * (points[i][0] - points[i - 1][0]) for i in after)
    assert generated == pytest.approx(sum(usages), abs=0.01)

    # Hidden (another tab in front): the polling stops, and starts again when shown.
    page.js("""() => {
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    time.sleep(0.5)  # a poll already under way may finish
    count = len([r for r in page.requests if r.url.endswith("/metrics")])
    time.sleep(2.5)
    assert len([r for r in page.requests if r.url.endswith("/metrics")]) == count
    assert "paused" in page.js("document.querySelector('#live-state').textContent")
    with page.page.expect_request(lambda r: r.url.endswith("/metrics"), timeout=5_000):
        page.js("""() => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
            document.dispatchEvent(new Event('visibilitychange'));
        }""")
    assert page.errors == []


def test_api_key_flow_shows_the_401_then_works(open_page, server):
    refused = httpx.get(server.url + "/v1/models", timeout=30)
    assert refused.status_code == 401
    message = refused.json()["error"]["message"]

    page = open_page(key=None)  # the page itself loads without a key
    assert page.response.status == 200
    page.page.wait_for_selector("#key-form:not([hidden])")
    assert page.js("document.querySelector('#key-message').textContent") == message

    page.page.fill("#key-input", "wrong-key")
    with page.page.expect_response(lambda r: r.url.endswith("/v1/models")) as answer:
        page.page.press("#key-input", "Enter")
    assert answer.value.status == 401 and answer.value.request.headers["authorization"] == "Bearer wrong-key"
    assert page.page.is_visible("#key-form")
    assert page.js("document.querySelector('#key-message').textContent") == message
    assert page.js("document.querySelector('#status').textContent") == "API key needed"

    page.page.fill("#key-input", API_KEY)
    with page.page.expect_response(lambda r: r.url.endswith("/v1/models")) as answer:
        page.page.click("#key-form button")
    assert answer.value.status == 200
    _ready(page)
    assert page.page.is_hidden("#key-form")
    assert page.js("sessionStorage.getItem('quantserve.apiKey')") == API_KEY
    page.wait("window.quantserveConsole.live.charts.kv.updates >= 1")  # /v1/memory answered with the key


def test_console_files_are_public_and_nothing_else_is():
    """The key check lets the console's files through and nothing beside them (in-process, no model)."""
    from fastapi.testclient import TestClient
    from quantserve.server.api.app import create_app
    from quantserve.server.config import Settings

    class _Never:
        state = "loading"

        async def start(self) -> None:  # the model never loads: only routing and the key check run
            return None

        async def shutdown(self) -> None:
            return None

    settings = Settings(api_key="k")
    with TestClient(create_app(settings, _Never())) as client:  # type: ignore[arg-type]
        assert client.get("/").status_code == 200
        for name in ("app.js", "api.js", "chat.js", "charts.js", "live.js", "memory.js", "models.js", "quant.js",
                     "style.css"):
            r = client.get(f"/console/{name}")
            assert r.status_code == 200 and r.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")
        missing = client.get("/console/secret.py")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert client.get("/console/../v1/models").status_code in (401, 404)
        assert client.get("/v1/models").status_code == 401


@pytest.mark.slow
def test_adapter_picker_chats_with_the_adapter(browser, default_model_dir, tmp_path):
    """A LoRA adapter appears in the picker as one (its base as parent); picked, the chat goes to
    it and the reply equals the openai client's for that adapter; charts and report stay the base's."""
    from .lora_helpers import ATTENTION, make_adapter

    adapter = make_adapter(default_model_dir, tmp_path / "attn", ATTENTION, seed=11)
    with start_server("--lora-modules", f"a1={adapter}") as srv:
        page = Page(browser, srv, API_KEY)
        _ready(page)
        options = page.js("[...document.querySelectorAll('#model option')].map((o) => [o.value, o.textContent])")
        assert options == [[MODEL, MODEL], ["a1", f"a1 (LoRA adapter on {MODEL})"]]
        page.page.select_option("#model", "a1")
        page.page.fill("#temperature", "0")
        page.page.fill("#max-tokens", "8")
        page.page.fill("#prompt", "Hi")
        with page.page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
            page.page.press("#prompt", "Enter")
        assert sent.value.post_data_json["model"] == "a1"
        page.page.wait_for_selector(".msg.assistant[data-done=true]")
        expected = srv.client().chat.completions.create(
            model="a1", messages=[{"role": "user", "content": "Hi"}], temperature=0, top_p=1, max_tokens=8)
        assert page.js("document.querySelector('.msg.assistant .text').textContent") == \
            expected.choices[0].message.content
        # The tokens the adapter generated show on the base model's chart (its metrics label).
        page.wait("window.quantserveConsole.live.charts.tokens.series[0].points.some((p) => p[1] > 0)")
        page.wait("document.querySelectorAll('#quant-body tbody tr').length > 0")
        assert page.errors == []
        page.close()


# ------------------------------------------------------------------ several models (a --models-dir)

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def _rows(page: Page) -> dict[str, dict]:
    """The models panel as shown: per model its state badge, its error line and its memory text."""
    return {r["model"]: r for r in page.js("""() => [...document.querySelectorAll('#models tbody tr')].map((tr) => ({
        model: tr.cells[0].querySelector('.name').textContent, state: tr.querySelector('.badge').textContent,
        error: (tr.querySelector('.reason') || {}).textContent || null,
        memory: tr.querySelector('.memory').textContent,
        load: !tr.querySelector('button.load').disabled, unload: !tr.querySelector('button.unload').disabled}))""")}


def _listing(srv: ServerProcess) -> dict[str, dict]:
    answer = httpx.get(srv.url + "/v1/models", headers=srv.headers(), timeout=30)
    assert answer.status_code == 200
    return {card["id"]: card for card in answer.json()["data"]}


def _wait_state(page: Page, model: str, state: str) -> None:
    page.wait(f"(document.querySelector('#models tr[data-model=\"{model}\"] .badge') || {{}}).textContent"
              f" === '{state}'")


@pytest.fixture(scope="module")
def models_server(default_model_dir, tmp_path_factory):
    """A registry of two models known from a --models-dir, neither loaded at startup: the default
    model (a link to its folder) and a tiny random-weight qwen3 with the default tokenizer."""
    import transformers

    from .test_families_server import _save

    root = tmp_path_factory.mktemp("console-models")
    (root / "smol").symlink_to(default_model_dir, target_is_directory=True)
    _save("qwen3", root / "tiny", transformers.AutoTokenizer.from_pretrained(default_model_dir), True)
    with start_server("--models-dir", str(root)) as srv:
        yield srv


def _chat(page: Page, srv: ServerProcess, model: str, question: str, max_tokens: int) -> str:
    """Picks `model`, sends `question` greedily and returns the reply the page streamed, after
    checking it against the openai client's for the same request."""
    page.page.select_option("#model", model)
    page.page.fill("#temperature", "0")
    page.page.fill("#max-tokens", str(max_tokens))
    page.page.fill("#prompt", question)
    done = page.js("document.querySelectorAll('.msg.assistant[data-done=true]').length")
    with page.page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.page.press("#prompt", "Enter")
    assert sent.value.post_data_json["model"] == model
    page.wait(f"document.querySelectorAll('.msg.assistant[data-done=true]').length > {done}")
    shown = page.js("[...document.querySelectorAll('.msg.assistant .text')].pop().textContent")
    expected = srv.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, top_p=1, max_tokens=max_tokens)
    assert shown == expected.choices[0].message.content and shown
    return shown


def test_models_panel_loads_chats_and_unloads(browser, models_server):
    """Both models listed as the server lists them; Load loads the tiny one (the server's own
    listing says so, with its measured memory shown); the chat answers with it as the openai client
    does; Unload unloads it (gone from /v1/memory too)."""
    srv = models_server
    page = Page(browser, srv, API_KEY)
    try:
        page.wait("document.querySelectorAll('#models tbody tr').length === 2")
        listing = _listing(srv)
        assert sorted(listing) == ["smol", "tiny"] and all(c["state"] == "unloaded" for c in listing.values())
        rows = _rows(page)
        assert {m: r["state"] for m, r in rows.items()} == {m: c["state"] for m, c in listing.items()}
        assert all(r["load"] and not r["unload"] for r in rows.values())
        # The picker offers every model, loaded or not.
        options = page.js("[...document.querySelectorAll('#model option')].map((o) => o.value)")
        assert sorted(options) == ["smol", "tiny"]

        with page.page.expect_response(lambda r: r.url.endswith("/models/load")) as answer:
            page.page.click('#models tr[data-model="tiny"] button.load')
        assert answer.value.status == 200
        assert answer.value.request.headers["authorization"] == f"Bearer {API_KEY}"
        assert answer.value.request.post_data_json == {"model": "tiny"}
        _wait_state(page, "tiny", "loaded")
        listing = _listing(srv)
        assert listing["tiny"]["state"] == "loaded" and listing["smol"]["state"] == "unloaded"
        memory = listing["tiny"]["memory"]
        assert memory["estimated"] is False
        page.wait("document.querySelector('#models tr[data-model=\"tiny\"] .memory').textContent"
                  ".includes('measured')")
        shown = _rows(page)["tiny"]
        assert shown["memory"].startswith(f"weights {_mib(memory['weight_bytes'])} · "
                                          f"KV cache {_mib(memory['kv_cache_bytes'])} · "
                                          f"{_mib(memory['total_bytes'])} in all")
        assert not shown["load"] and shown["unload"]

        _chat(page, srv, "tiny", "Say something.", 6)
        assert _listing(srv)["smol"]["state"] == "unloaded"  # the chat touched the tiny model only

        with page.page.expect_response(lambda r: r.url.endswith("/models/unload")) as answer:
            page.page.click('#models tr[data-model="tiny"] button.unload')
        assert answer.value.status == 200
        _wait_state(page, "tiny", "unloaded")
        assert _listing(srv)["tiny"]["state"] == "unloaded"
        held = httpx.get(srv.url + "/v1/memory", headers=srv.headers(), timeout=30).json()["models"]
        assert "tiny" not in [m["model"] for m in held]
        assert page.errors == []
    finally:
        page.close()


def test_chat_with_an_unloaded_model_loads_it(browser, models_server):
    """The chat picks a model nobody loaded: its first message loads it (the server does), the
    panel follows the state to loaded without a reload, and the reply is the openai client's."""
    srv = models_server
    if _listing(srv)["smol"]["state"] != "unloaded":
        httpx.post(srv.url + "/models/unload", json={"model": "smol"}, headers=srv.headers(), timeout=60)
    page = Page(browser, srv, API_KEY)
    try:
        page.wait("document.querySelectorAll('#models tbody tr').length === 2")
        page.page.select_option("#model", "smol")
        assert "the first message loads it" in page.js("document.querySelector('#status').textContent")
        assert _rows(page)["smol"]["state"] == "unloaded"
        reply = _chat(page, srv, "smol", "What is the capital of France?", 8)
        assert "Paris" in reply
        assert _listing(srv)["smol"]["state"] == "loaded"
        _wait_state(page, "smol", "loaded")
        page.wait("document.querySelector('#status').textContent.startsWith('ready')")
        page.wait("document.querySelectorAll('#quant-body tbody tr').length > 0")  # its report, once loaded
        assert page.errors == []
    finally:
        page.close()


# ------------------------------------------------------------------ speculative decoding

def test_speculation_line_matches_the_servers_counters(browser):
    """A server with n-gram speculation: after a copy-heavy chat the Live panel's line gives the
    verifications, the draft tokens accepted of those drafted and the acceptance by position, as
    /metrics has them (parsed here in Python); a server without speculation shows no such line."""
    import re

    config = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    text = "alpha, beta, gamma, delta, epsilon, zeta, eta, theta, iota, kappa"
    with start_server("--speculative-config", config) as srv:
        srv.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Repeat exactly: {text}. Again: {text}."}],
            temperature=0, max_tokens=48)
        page = Page(browser, srv, API_KEY)
        _ready(page)
        page.wait("!document.getElementById('spec').hidden")
        shown = page.js("document.getElementById('spec').textContent")
        lines = httpx.get(srv.url + "/metrics", timeout=30).text.splitlines()

        def value(name: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))

        drafts, drafted = value("vllm:spec_decode_num_drafts_total"), value("vllm:spec_decode_num_draft_tokens_total")
        accepted = value("vllm:spec_decode_num_accepted_tokens_total")
        per_pos = sorted((int(re.search(r'position="(\d+)"', line)[1]), float(line.rsplit(" ", 1)[1]))
                         for line in lines if line.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total{"))
        assert drafts > 0 and drafted >= accepted > 0
        expected = (f"Speculative decoding: {drafts:.0f} verifications, {accepted:.0f} of {drafted:.0f} draft tokens "
                    f"accepted ({100 * accepted / drafted:.0f}%)")
        assert shown.startswith(expected), (shown, expected)
        assert shown.endswith(", ".join(f"{100 * n / drafts:.0f}%" for _, n in per_pos))
        assert page.errors == []
        page.close()


def test_no_speculation_line_without_it(open_page):
    page = open_page()
    _ready(page)
    page.wait("window.quantserveConsole.live.previous !== null")
    assert page.js("document.getElementById('spec').hidden") is True
    assert page.errors == []
