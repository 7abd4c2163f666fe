"""Model registry: model id -> a loaded, running engine. Loads at startup, in the background, so
the port opens at once and /health can say "loading" rather than nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, Literal, Optional

from ..engine.errors import ShuttingDownError
from .errors import APIError, model_not_found, unavailable

logger = logging.getLogger("quantserve.server")


@dataclasses.dataclass
class ServedModel:
    """A model as the HTTP layer sees it: its engine, its tokenizer, and what loading reported."""

    name: str
    engine: Any  # server.engine.AsyncEngine (narrow interface: generate / abort / health / stats)
    tokenizer: Any
    max_model_len: int
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    load_report: Any = None  # the loader's report (bytes, layers, load time), shown by /v1/memory

    _spare: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One copy made now, while loading: a copy is ~250 ms of Python holding the GIL, which on a
        # serving thread stalls the event loop (/health) and the engine for that long.
        self._spare.put(copy.deepcopy(self.tokenizer))

    @contextlib.contextmanager
    def _tokenizer(self) -> Iterator[Any]:
        """A copy of the tokenizer no other thread uses meanwhile (a fast tokenizer used by two
        threads at once can fail, "Already borrowed"): the HTTP side encodes on worker threads and
        decodes on the event loop's thread, and the engine thread decodes with a copy of its own.
        Copies are lent and given back, so there are only as many as calls ever overlapped."""
        try:
            tokenizer = self._spare.get_nowait()
        except queue.Empty:
            tokenizer = copy.deepcopy(self.tokenizer)
        try:
            yield tokenizer
        finally:
            self._spare.put(tokenizer)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
        """Chat template -> prompt token ids (with the assistant's generation prompt unless told not
        to); template_kwargs: more variables for the template (e.g. enable_thinking)."""
        with self._tokenizer() as tokenizer:
            return self._render(tokenizer, messages, add_generation_prompt, template_kwargs)

    def _render(self, tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: Optional[dict[str, Any]]) -> list[int]:
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, f"model '{self.name}' has no chat template (its tokenizer has none and no "
                                "--chat-template was given): use /v1/completions, or serve it with --chat-template FILE",
                           param="messages")
        from jinja2 import TemplateError

        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                **(template_kwargs or {}))
        except TemplateError as exc:  # the template's own words (raise_exception): a role order etc.
            raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
        except Exception:  # the tokenizer's internals are no message for the client
            logger.debug("rendering a chat failed", exc_info=True)
            raise APIError(400, "these messages could not be tokenized (is every text valid Unicode, without lone "
                                "surrogates such as \\ud800?)", param="messages", code="invalid_text") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of `text`; 400 for text that is not valid Unicode (JSON lets a lone surrogate
        such as "\\ud800" through; the tokenizer refuses it with a TypeError)."""
        try:
            with self._tokenizer() as tokenizer:
                return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except TypeError:
            if isinstance(text, str) and not _encodable(text):
                raise APIError(400, f"{param} is not valid Unicode: it holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                                    "without its pair)", param=param, code="invalid_text") from None
            raise

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._tokenizer() as tokenizer:
            return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        with self._tokenizer() as tokenizer:
            return tokenizer.decode([token_id])


Loader = Callable[[], ServedModel]


class Registry:
    """Holds the served model(s). `start()` loads in a worker thread and starts the engine."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader
        self._models: dict[str, ServedModel] = {}
        self.state: Literal["loading", "ready", "failed", "stopped"] = "loading"
        self.error: Optional[str] = None
        self.started_at = time.time()

    async def start(self) -> None:
        try:
            served = await _in_daemon_thread(self._loader)
            await served.engine.start()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - even SystemExit from the loader thread is a failed load
            self.error = _reason(exc)
            if isinstance(exc, (ValueError, OSError)):  # the loader's one-line errors: a bad model or path
                logger.error("loading the model failed: %s", self.error)
                logger.debug("loading the model failed", exc_info=True)
            else:  # anything else may be a bug: keep the traceback in the log
                logger.exception("loading the model failed: %s", self.error)
            self.state = "failed"  # last: the server's watchdog stops the process on seeing it
            return
        self._models[served.name] = served
        self.state = "ready"

    def fail_unfinished(self, reason: str) -> None:
        """Every request still running ends with 503 `reason` (see serve.py's drain limit)."""
        for served in self.models():
            served.engine.fail_unfinished(ShuttingDownError(reason))

    async def shutdown(self) -> None:
        self.state = "stopped"
        for served in {id(m): m for m in self._models.values()}.values():
            await served.engine.shutdown()

    def models(self) -> list[ServedModel]:
        return list({id(m): m for m in self._models.values()}.values())

    def get(self, name: Optional[str]) -> ServedModel:
        """The served model `name` is, or is an adapter of (404 model_not_found for neither)."""
        return self.resolve(name)[0]

    def resolve(self, name: Optional[str]) -> tuple[ServedModel, Optional[str]]:
        """(served model, LoRA adapter name or None) for a request's "model" (vLLM's convention:
        a loaded adapter's name picks that adapter on its base)."""
        if self.state == "loading":
            raise unavailable("The model is still loading; retry shortly.", retry_after=5)
        if self.state != "ready":
            raise unavailable(f"The model is not available ({self.error or self.state}).")
        if name is None:
            return self.models()[0], None
        served = self._models.get(name)
        if served is not None:
            return served, None
        for served in self.models():
            loras = getattr(served.engine, "loras", None)
            if loras is not None and loras.get(name) is not None:
                return served, name
        raise model_not_found(name)

    def health(self) -> tuple[bool, str]:
        """(serving, reason): serving only when loaded and every engine thread is alive."""
        if self.state != "ready":
            return False, self.error or self.state
        for served in self.models():
            alive, error = served.engine.health()
            if not alive:
                return False, f"engine for '{served.name}' stopped: {error}"
        return True, "ok"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _reason(exc: BaseException) -> str:
    """One line naming the cause: the loader's ValueError/OSError messages say it themselves;
    other exceptions (MemoryError, torch's OutOfMemoryError, bugs) also need their type."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return f"not enough memory to load the model ({type(exc).__name__}{': ' + text if text else ''})"
    if isinstance(exc, (ValueError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a daemon thread. Not asyncio.to_thread: a process asked to stop while loading
    (SIGTERM) would wait at exit for the executor's thread to finish loading, for minutes."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if future.done():  # cancelled: nobody wants the model any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the event loop has closed: the server stopped meanwhile
            pass

    threading.Thread(target=target, name="quantserve-loader", daemon=True).start()
    return await future
