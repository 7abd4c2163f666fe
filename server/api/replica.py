"""x-quantserve-replica on every response: which server answered, so that a client or a test behind
a router (vllm-router, Ray Serve, a Kubernetes Service) can see where a request went. A plain
server names itself host:pid; a Ray replica's response carries the Ray replica id instead
(server/ray/forward.py replaces it)."""

from __future__ import annotations

import os
import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = b"x-quantserve-replica"


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ReplicaHeader:
    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app, self.value = app, replica_id.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REPLICA_HEADER]
                message = {**message, "headers": headers + [(REPLICA_HEADER, self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)
