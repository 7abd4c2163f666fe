"""ServedModel: a loaded model as the HTTP layer sees it (its engine, its tokenizer, what loading
reported), with the tokenizer work the routes do on it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import queue
import time
from typing import Any, Iterator, Optional

from .errors import APIError

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

    def close(self) -> None:
        """Drop the tokenizer copies (the model is unloaded; its engine has stopped)."""
        while True:
            try:
                self._spare.get_nowait()
            except queue.Empty:
                return

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


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
