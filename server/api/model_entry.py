"""A registry entry: one known model, its state, its cost, and the leases HTTP requests hold on
it (the ModelLeases middleware ends them when a response has been sent in full)."""

from __future__ import annotations

import contextvars
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Literal, Optional

from ..loading.catalog import ModelSpec
from .served_model import ServedModel

if TYPE_CHECKING:
    import asyncio

    from .registry import Registry

State = Literal["unloaded", "loading", "loaded", "unloading", "error"]


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """What a model takes while loaded, as `quantserve estimate` prices it (bytes)."""

    weight_bytes: int
    kv_cache_bytes: int
    total_bytes: int  # weights + KV cache + one step's activations


@dataclasses.dataclass(eq=False)
class ModelEntry:
    """One known model and its state (changed on the event loop's thread only)."""

    spec: ModelSpec
    state: State = "unloaded"
    error: Optional[str] = None
    served: Optional[ServedModel] = None
    cost: Optional[ModelCost] = None
    loading: "Optional[asyncio.Future]" = None  # the load in progress, awaited by every request for it
    leases: int = 0  # HTTP requests holding it now
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    keep_alive: Optional[float] = None  # a request's override; None: the spec's
    load_seconds: Optional[float] = None
    loads: int = 0  # loads started
    unloads: int = 0
    spec_created: int = dataclasses.field(default_factory=lambda: int(time.time()))  # known since

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> bool:
        return self.leases > 0 or (self.served is not None and self.served.engine.num_unfinished > 0)

    def expires_at(self) -> Optional[float]:
        """Monotonic time at which an idle loaded model is unloaded (None: never)."""
        keep = self.keep_alive if self.keep_alive is not None else self.spec.keep_alive
        if keep is None or keep < 0:
            return None
        return self.last_used + keep


# The leases one HTTP request holds (ModelLeases sets a list per request; resolve() appends).
LEASES: contextvars.ContextVar[Optional[list[ModelEntry]]] = contextvars.ContextVar("quantserve_leases",
                                                                                      default=None)


class ModelLeases:
    """ASGI middleware: the models a request resolved stay leased until its response is sent in
    full (a stream's last byte, or the client gone), then count as used at that moment."""

    def __init__(self, app: Any, registry: "Registry") -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[ModelEntry] = []
        token = LEASES.set(held)
        try:
            await self.app(scope, receive, send)
        finally:
            LEASES.reset(token)
            for entry in held:
                self.registry.release(entry)
