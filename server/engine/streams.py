"""Per-request output channels between the engine thread and asyncio consumers.

Collector: one request's channel; `put` runs on the consumer's event loop (the engine thread
schedules it with call_soon_threadsafe) and merges outputs not yet read, so it never grows with
a slow reader. RequestStream: the async iterator `AsyncEngine.generate` returns.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from .outputs import RequestOutput


class Collector:
    """One request's output channel. put() runs on the consumer's event loop; it merges
    outputs the consumer has not taken yet, so it never grows with a slow reader."""

    __slots__ = ("output", "error", "event")

    def __init__(self) -> None:
        self.output: Optional[RequestOutput] = None
        self.error: Optional[BaseException] = None
        self.event = asyncio.Event()

    def put(self, item: Any) -> None:
        if isinstance(item, BaseException):
            if self.error is None:
                self.error = item
        elif self.output is None:
            self.output = item
        else:
            self.output.merge(item)
        self.event.set()

    async def get(self) -> RequestOutput:
        while self.output is None and self.error is None:
            self.event.clear()
            await self.event.wait()
        if self.output is not None:
            out, self.output = self.output, None
            return out
        raise self.error  # type: ignore[misc]


def deliver(items: list[tuple[Collector, Any]]) -> None:
    """On the consumers' event loop: hand one engine step's outputs to their collectors."""
    for collector, item in items:
        collector.put(item)


class RequestStream:
    """The async iterator `generate` returns. Closing it (aclose, cancelling the task that reads
    it, or dropping it) calls `abort`; the request's KV blocks are freed at the next step.
    `abort` must be safe to call from garbage collection on any thread (the engine's only appends
    to its inbox)."""

    def __init__(self, request_id: str, collector: Collector, abort: Callable[[], None]) -> None:
        self.request_id = request_id
        self._collector = collector
        self._abort = abort
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._collector.get()
        except asyncio.CancelledError:
            self._close()
            raise
        except BaseException:
            self._done = True
            raise
        if out.finished:
            self._done = True
        return out

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._abort()

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self._close()
