"""Property-based fuzzing of every route in the server's own OpenAPI schema (schemathesis), against a
real server on the default model: whatever a client sends that the schema allows (and, in the
negative mode, what it does not), the answer is never a 5xx and comes within REQUEST_TIMEOUT
seconds; the server is healthy and still answers a chat afterwards.

Bounded in time for a 2-core machine: EXAMPLES per route, a short context (--max-model-len 128)
and n at most 2, so that a generated max_tokens or n cannot make one example run for minutes.
Runtime LoRA loading is on (inside an empty root) so that its routes are in the schema too."""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 - schemathesis brings hypothesis
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from .serving import MODEL, start_server  # noqa: E402

EXAMPLES = 12  # per route and mode; ~25 routes
REQUEST_TIMEOUT = 60.0  # s: a hang, not a slow answer (the longest example generates 128 tokens)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty-lora-root")
    with start_server("--max-model-len", "128", "--max-n", "2", "--max-num-seqs", "8",
                      "--enable-lora-runtime-load", "--lora-root", str(root)) as srv:
        yield srv


@pytest.fixture(scope="module")
def operations(server):
    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=server.headers())
    ops = [result.ok() for result in loaded.get_all_operations()]
    assert len(ops) >= 20, [f"{op.method} {op.path}" for op in ops]  # every route of the API is in it
    return ops


def test_no_route_answers_5xx_or_hangs(server, operations):
    """EXAMPLES cases per route in each mode (valid per the schema, and not), each sent to the
    server; every failure is collected (one line each, with its curl) and reported at the end."""
    failures: list[str] = []

    def check(case, mode) -> None:
        if mode is GenerationMode.POSITIVE:  # a valid case names the served model, to reach the engine
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            if "model_id" in (case.path_parameters or {}):
                case.path_parameters["model_id"] = MODEL
        try:
            response = case.call(base_url=server.url, headers=server.headers(), timeout=REQUEST_TIMEOUT)
        except Exception as exc:  # requests' timeout: the server hung on this case
            failures.append(f"{case.method} {case.formatted_path}: {type(exc).__name__} {exc}\n  {case.as_curl_command()}")
            return
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}\n"
                            f"  {case.as_curl_command()}")

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                check(case, mode)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                assert mode is GenerationMode.NEGATIVE, f"{op.method} {op.path}"
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def test_server_is_healthy_after(server):
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    chat = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3)
    assert chat.choices[0].message.content is not None
    log = server.log_text()
    assert "Exception in ASGI application" not in log and "Traceback" not in log, server.log_tail()
