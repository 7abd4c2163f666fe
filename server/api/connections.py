"""uvicorn's h11 protocol with a deadline on each request's headers (slowloris).

uvicorn closes a connection idle between requests (timeout_keep_alive) but waits forever for the
headers of a request whose first byte has arrived: a client sending one byte every few seconds
holds a socket, and a few hundred such clients hold them all. Here the headers must be complete
`timeout` seconds after the connection opens, or after the previous response on a kept-alive
connection; otherwise the connection is closed (after a 408 if part of a request had come). The body's deadline is guards.BodyLimit's.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _timeout_response(timeout: float) -> bytes:
    body = json.dumps({"error": {"message": f"The request's headers did not arrive within {timeout:g} s "
                                            "(--header-timeout)", "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


def header_timeout_protocol(timeout: float) -> type:
    """The protocol class for uvicorn.Config(http=...)."""
    response = _timeout_response(timeout)

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: Optional[asyncio.TimerHandle] = None
        _started = False  # bytes of the next request have arrived since the timer was armed

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._started = True  # bytes of a request: a deadline missed now is answered 408
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in: the app has it
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # before: a pipelined request parsed by the super call disarms it again
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._started = False
            self._header_timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._started:  # an idle connection is closed without a word, as keep-alive's
                    self.transport.write(response)
                self.transport.close()

    return HeaderTimeoutH11Protocol
