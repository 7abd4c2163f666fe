"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status;
on Anthropic's routes (/v1/messages...) Anthropic's shape: {"type": "error", "error": {"type", "message"}}.

Routes raise APIError, or let the engine's errors through (from_exception maps them); the handlers
installed by `install_error_handlers` turn everything, including FastAPI's own validation errors
and our bugs, into that shape. A bug is a 500 whose message carries the request id that the log
line also carries, never a traceback.
"""

from __future__ import annotations

import logging
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, ShuttingDownError
from .protocol_models import ErrorInfo, ErrorResponse

logger = logging.getLogger("quantserve.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        message, param = _utf8(message), None if param is None else _utf8(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()

    def anthropic_body(self) -> dict:
        """Anthropic's shape; its error type follows from the status (Anthropic's table)."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str = "") -> JSONResponse:
        """The JSON response, in the shape of the API that `path` belongs to."""
        body = self.anthropic_body() if is_anthropic(path) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _utf8(text: str) -> str:
    """`text` as valid UTF-8: a message that quotes the client's input may hold a lone surrogate
    (JSON's "\\ud800"), which the JSON response could not encode (a 500 instead of the error)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")


def overloaded(retry_after: float) -> APIError:
    seconds = str(max(1, int(round(retry_after))))
    return APIError(
        429, "The server is overloaded: too many requests are waiting. Retry later.",
        "rate_limit_error", None, "too_many_requests", {"Retry-After": seconds},
    )


def unavailable(message: str, retry_after: Optional[int] = None) -> APIError:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return APIError(503, message, "service_unavailable", None, "service_unavailable", headers)


def internal_error(request_id: str) -> APIError:
    return APIError(500, f"Internal server error (request id {request_id}); this is a bug in quantserve.",
                    "internal_error", None, "internal_error")


def from_exception(exc: BaseException, request_id: Optional[str] = None) -> APIError:
    """The OpenAI-shaped error for any exception. Exception text reaches the client only for the
    client's own mistakes; our failures are logged with the request id and answered generically."""
    request_id = request_id or uuid.uuid4().hex
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc), exc.field, exc.code)
    if isinstance(exc, EngineOverloadedError):
        return overloaded(exc.retry_after)
    if isinstance(exc, ShuttingDownError):
        logger.warning("request %s: %s", request_id, exc)
        return unavailable("The server is shutting down and could not finish this request; retry it.",
                           retry_after=1)
    if isinstance(exc, EngineDeadError):
        logger.error("request %s: engine unavailable: %s", request_id, exc)
        return unavailable("The inference engine has stopped; the server is restarting. Retry shortly.",
                           retry_after=5)
    logger.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc, exc_info=exc)
    return internal_error(request_id)


_STATUS_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return bad_request("The request body is not valid JSON", None, "invalid_json")
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unsupported parameter: '{param}' is not supported by this server.", param,
                           "unsupported_parameter")
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return bad_request(f"{param}: {msg}{more}" if param else f"{msg}{more}", param, "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, code = _STATUS_TYPES.get(exc.status_code, ("invalid_request_error", None))
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return APIError(exc.status_code, message, type_, None, code, dict(exc.headers or {})).response(request.url.path)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        # Engine errors that escape a non-streamed request (the engine died, a step failed), and bugs.
        return from_exception(exc).response(request.url.path)
