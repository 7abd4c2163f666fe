"""The server these tests start, through the harness tests and benchmarks share
(quantserve.server.testing): the built-in default model with a 0.25 GiB KV cache (a quick start on
a CPU) and, unless told otherwise, an API key."""

from __future__ import annotations

from typing import Any, Optional

from quantserve.server.testing import ServerProcess, run_serve  # noqa: F401 - re-exported for the tests

API_KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def start_server(*flags: str, api_key: Optional[str] = API_KEY, **kwargs: Any) -> ServerProcess:
    """`quantserve serve --kv-cache-memory 0.25 *flags` started (not yet ready: `with` waits for
    /health, stops it on the way out and fails unless it exited 0)."""
    return ServerProcess("--kv-cache-memory", "0.25", *flags, api_key=api_key, **kwargs)
