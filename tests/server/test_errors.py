"""Engine errors -> OpenAI errors: the client's mistakes are named with the request's own fields;
our failures are answered generically (no exception text leaves the server) and logged."""

from __future__ import annotations

import logging

from quantserve.server.api import protocol as p
from quantserve.server.api.convert import api_error
from quantserve.server.api.errors import from_exception
from quantserve.server.engine import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError

CHAT = p.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5,
                               logprobs=True, top_logprobs=3)
COMPLETION = p.CompletionRequest(model="m", prompt="hi")


def test_engine_fields_become_the_request_fields():
    for field, chat_param, completion_param in [
        ("prompt", "messages", "prompt"),
        ("max_tokens", "max_completion_tokens", "max_tokens"),
        ("logprobs", "top_logprobs", "logprobs"),
        ("n", "n", "n"),
    ]:
        exc = InvalidRequestError("too big", field, "context_length_exceeded")
        for body, param in ((CHAT, chat_param), (COMPLETION, completion_param)):
            err = api_error(exc, body, "req-1")
            assert (err.status, err.param, err.code) == (400, param, "context_length_exceeded")
            assert err.message == "too big"


def test_our_failures_say_nothing_of_their_cause(caplog):
    secret = "/home/alice/model/secret.safetensors: CUDA error 700"
    with caplog.at_level(logging.ERROR, logger="quantserve.server"):
        for exc in (RequestFailedError(secret), RuntimeError(secret), KeyError(secret)):
            body = from_exception(exc, "req-42").body()["error"]
            assert body["type"] == "internal_error" and "req-42" in body["message"]
            assert "alice" not in str(body) and "CUDA" not in str(body)
    assert "alice" in caplog.text and "req-42" in caplog.text  # the cause is in the log, with the id


def test_engine_states_map_to_retryable_statuses():
    dead = from_exception(EngineDeadError("engine thread died: Fatal('x')"))
    assert dead.status == 503 and dead.type == "service_unavailable" and "Fatal" not in dead.message
    assert int(dead.headers["Retry-After"]) >= 1
    busy = from_exception(EngineOverloadedError("300 waiting", retry_after=7.4))
    assert busy.status == 429 and busy.headers["Retry-After"] == "7"
