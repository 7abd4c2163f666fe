"""What the tests of the agent-facing APIs share (Messages, Responses, embeddings, reasoning,
chat details): a real `quantserve serve` process on a free port, started once per session per
flag set, and the chat template whose assistant turns think in <think> tags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

API_KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"
THINKING_TEMPLATE = Path(__file__).parent / "fixtures" / "thinking_chatml.jinja"


class Server:
    def __init__(self, *flags: str, api_key: Optional[str] = API_KEY) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "quantserve.server", "serve", "--port", str(self.port), "--kv-cache-memory", "0.25",
               *flags, *(["--api-key", api_key] if api_key else [])]
        self.log = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"quantserve-apis-{self.port}.log"
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log.read_text()[-4000:])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0)

    def anthropic(self):
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key=self.api_key or "none", max_retries=0)

    def post(self, path: str, body: dict, **headers: str) -> httpx.Response:
        sent = {"Authorization": f"Bearer {self.api_key}", **headers} if self.api_key else headers
        return httpx.post(self.url + path, json=body, headers=sent, timeout=300)


def serving(*flags: str) -> Iterator[Server]:
    server = Server(*flags)
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, server.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def api_server(default_model_dir) -> Iterator[Server]:
    """The default server (NF4): Messages, Responses and chat completions tests share it."""
    yield from serving()


@pytest.fixture(scope="session")
def thinking_server(default_model_dir) -> Iterator[Server]:
    """Unquantized (the embeddings' oracle is transformers on the same weights), full float32
    products, the thinking template, and the deepseek_r1 reasoning parser."""
    yield from serving("--quant", "none", "--matmul-precision", "highest", "--chat-template", str(THINKING_TEMPLATE),
                       "--reasoning-parser", "deepseek_r1")
