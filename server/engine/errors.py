"""What `AsyncEngine.generate` and its streams raise (pure Python: the HTTP layer imports these
without torch). Each maps to one HTTP status in server/api/errors.py."""

from __future__ import annotations

from typing import Optional


class InvalidRequestError(ValueError):
    """The request breaks a rule of the engine (a limit, a range, the context length).

    `field` names the offending input in the engine's words (prompt, max_tokens, n, stop,
    logprobs, ...); the HTTP layer translates it to the wire field. `code` is OpenAI's error code
    where one exists (context_length_exceeded), else invalid_value.
    """

    def __init__(self, message: str, field: Optional[str] = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.field, self.code = field, code


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (it failed, or the engine was shut down)."""


class ShuttingDownError(EngineDeadError):
    """The server is stopping and its drain limit (--shutdown-timeout) ran out before this request
    finished."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (an error in a step it was part of)."""
