"""What the tests of the agent-facing APIs share (Messages, Responses, embeddings, reasoning,
chat details): a real `quantserve serve` process through the shared harness, started once per
session per flag set, and the chat template whose assistant turns think in <think> tags."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

from quantserve.server.testing import ServerProcess

API_KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"
THINKING_TEMPLATE = Path(__file__).parent / "fixtures" / "thinking_chatml.jinja"


class Server(ServerProcess):
    """The shared harness (quantserve.server.testing) with the default test flags, an API key, and
    clients for the APIs these tests speak."""

    def __init__(self, *flags: str, api_key: Optional[str] = API_KEY) -> None:
        super().__init__("--kv-cache-memory", "0.25", *flags, api_key=api_key)

    def openai(self):
        return self.client()

    def anthropic(self):
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key=self.api_key or "none", max_retries=0)

    def post(self, path: str, body: dict, **headers: str) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={**self.headers(), **headers}, timeout=300)


def serving(*flags: str) -> Iterator[Server]:
    """A server for a session-scoped fixture: ready on entry, stopped (and exited 0) on the way out."""
    with Server(*flags) as server:
        yield server


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
