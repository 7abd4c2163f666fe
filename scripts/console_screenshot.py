"""Take the README's picture of the web console (docs/console.png) with a real browser.

Starts `quantserve serve` on the built-in default model, opens GET / in Debian's chromium (through
playwright), asks the chat playground a question while a few requests run beside it (so the live
charts have something to show), and saves a screenshot of the whole page.

    .venv/bin/python scripts/console_screenshot.py [--out docs/console.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
from playwright.sync_api import sync_playwright

from quantserve.server.testing import ServerProcess

QUESTION = "Give me three tips for staying focused while studying."
LOAD = ["Write a short poem about the sea.", "Explain what a KV cache is.", "List five fruits and their colours.",
        "Tell me a fact about Paris."]


def background_load(url: str, model: str, stop: threading.Event) -> None:
    """A few requests at a time, so tokens/s, running requests and KV blocks move."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    def one(prompt: str) -> None:
        while not stop.is_set():
            try:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=48)
            except openai.APIError:
                return  # the server is going away

    threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in LOAD]
    for t in threads:
        t.start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "console.png"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--load-seconds", type=float, default=25.0, help="how long the charts run before the picture")
    args = ap.parse_args()

    server = ServerProcess("--kv-cache-memory", "0.25", name="console")
    url = server.url
    stop = threading.Event()
    try:
        server.wait_ready()
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url + "/")
            page.wait_for_function("() => document.querySelector('#model').options.length > 0")
            background_load(url, model, stop)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "120")
            page.fill("#prompt", QUESTION)
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.assistant[data-done=true]")
            time.sleep(args.load_seconds)  # the picture is taken while the load still runs
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        stop.set()
        server.stop()


if __name__ == "__main__":
    main()
