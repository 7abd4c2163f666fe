"""The model registry: every model the server knows (loading/catalog.py), loaded on demand, kept
alive, and unloaded to fit.

States: unloaded -> loading -> loaded -> (unloading ->) unloaded, or error (with its reason).
- A request naming an unloaded model loads it and waits; concurrent first requests share the one
  load. A load runs on a daemon thread at the lowest CPU priority (and with one compute thread
  while other models serve), warm-up included: the device worker stepping the loaded models is
  not held up by it.
- Memory is counted, not guessed: each model costs what `quantserve estimate` prices (weights + KV
  cache + one step's activations). Before a load the least recently used *idle* models are
  unloaded until the newcomer fits the budget (--models-memory) and the count (--models-max). A
  model with requests in flight is never unloaded under them: a load that only fits by doing so
  gets 503 + Retry-After; one that does not fit even alone gets 507, both naming the numbers.
- Keep-alive (Ollama's): a model is unloaded once idle for its keep-alive (a request's keep_alive
  sets it for its model; negative = forever, 0 = as soon as it is idle).
- Requests hold a lease on their model from resolve() until their HTTP exchange ends (the
  ModelLeases middleware), streams included: "idle" is no lease and no unfinished request.
- A model that fails to load or whose engine dies is marked error and answers 503 for itself;
  the others serve on. A one-model server (Catalog.single) still stops on it, so that a
  supervisor restarts it (serve.Watchdog).
All registry state is changed on the event loop's thread; loads run in threads and report back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Literal, Optional

from ..engine.errors import ShuttingDownError
from ..loading.catalog import Catalog, ModelSpec
from .errors import APIError, model_not_found, unavailable
from .load_thread import give_back_memory, in_daemon_thread
from .model_entry import LEASES, ModelCost, ModelEntry
from .served_model import ServedModel

logger = logging.getLogger("quantserve.server")

GIB = 2**30


Loader = Callable[[ModelSpec, Any], ServedModel]  # (spec, its device's worker) -> the model, loaded and warm
Estimator = Callable[[ModelSpec], ModelCost]


class Registry:
    """The served models (see the module docstring). `start()` loads the startup models."""

    def __init__(self, catalog: Catalog, loader: Loader, estimator: Optional[Estimator] = None,
                 budget_bytes: Optional[int] = None, max_loaded: Optional[int] = None,
                 workers: Optional[Callable[[ModelSpec], Any]] = None) -> None:
        self.catalog = catalog
        self._entries = {spec.name: ModelEntry(spec) for spec in catalog.specs}
        self._loader = loader
        self._estimator = estimator
        self.budget_bytes = budget_bytes
        self.max_loaded = max_loaded
        self._workers = workers or (lambda spec: None)
        self.state: Literal["loading", "ready", "failed", "stopped"] = "loading"
        self.error: Optional[str] = None
        self.started_at = time.time()
        # One load (or estimate) at a time: it decides and takes its room alone, and estimates and
        # loads never overlap (see _estimate_all).
        self._room = asyncio.Lock()
        self._keeper: Optional[asyncio.Task] = None
        self._estimating: Optional[asyncio.Task] = None
        self._keeper_wake = asyncio.Event()  # set when a model may have just expired (keep_alive 0)

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the startup models, one after another; then keep the keep-alives."""
        for entry in self._entries.values():
            if not entry.spec.preload or self.state == "stopped":
                continue
            try:
                await self._ensure_loaded(entry)
            except asyncio.CancelledError:
                raise
            except APIError as exc:
                if self.catalog.single:  # the loader's own words (a one-model server's exit line), else ours
                    self._fail(entry.error or exc.message)
                    return
                logger.error("model '%s' was not loaded at startup: %s", entry.name, exc.message)
        if self.state == "loading":
            self.state = "ready"
        self._keeper = asyncio.create_task(self._keep())
        if self._estimator is not None:
            self._estimating = asyncio.create_task(self._estimate_all())

    async def _estimate_all(self) -> None:
        """Price every model not yet priced, one at a time, at low priority: /v1/models shows each
        one's cost from the start, and a first request pays its model's load, not its estimate."""
        for entry in list(self._entries.values()):
            if entry.cost is not None or entry.state != "unloaded" or self.state != "ready":
                continue
            # Under the room lock: an estimate builds its model skeleton under accelerate's
            # init_empty_weights, which patches torch.nn.Module for the whole process; a load
            # running meanwhile would build its modules through that patch.
            async with self._room:
                if entry.cost is not None or entry.state != "unloaded":
                    continue
                try:  # at the lowest priority once a model serves (the first estimate imports for ~2 s)
                    entry.cost = await in_daemon_thread(lambda: self._estimator(entry.spec), "quantserve-estimate",
                                                         background=bool(self.models()))
                except Exception:  # noqa: BLE001 - priced (or refused with its reason) when first asked for
                    logger.debug("estimating model '%s' failed", entry.name, exc_info=True)

    def _fail(self, reason: str) -> None:
        self.error = reason
        self.state = "failed"  # last: the server's watchdog stops the process on seeing it

    def fail_unfinished(self, reason: str) -> None:
        """Every request still running ends with 503 `reason` (see serve.py's drain limit)."""
        for served in self.models():
            served.engine.fail_unfinished(ShuttingDownError(reason))

    async def shutdown(self) -> None:
        self.state = "stopped"
        for task in (self._keeper, self._estimating):
            if task is not None:
                task.cancel()
        for entry in self._entries.values():
            if entry.served is not None:
                await entry.served.engine.shutdown()

    # ------------------------------------------------------------------------------ lookups

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def entry(self, name: str) -> ModelEntry:
        found = self._entries.get(name)
        if found is None:
            raise model_not_found(name)
        return found

    def used_bytes(self) -> int:
        """What the loaded models take together, as estimated (the budget's count)."""
        return sum(e.cost.total_bytes for e in self._entries.values() if e.state == "loaded" and e.cost is not None)

    def models(self) -> list[ServedModel]:
        """The loaded models."""
        return [e.served for e in self._entries.values() if e.state == "loaded" and e.served is not None]

    def get(self, name: Optional[str]) -> ServedModel:
        """A loaded model (or the base of an adapter) by name, without loading it (503 while it is
        not loaded)."""
        self.check_serving()
        entry, _ = self._find(name)
        if entry.state != "loaded" or entry.served is None:
            raise self._not_loaded(entry)
        return entry.served

    async def resolve(self, name: Optional[str], keep_alive: Optional[float] = None) -> tuple[ServedModel, Optional[str]]:
        """(served model, LoRA adapter name or None) for a request's "model", loading the model if
        it is not (vLLM's convention: a loaded adapter's name picks that adapter on its base). The
        model is leased to the HTTP request until it ends; keep_alive: the request's keep_alive."""
        self.check_serving()
        entry, adapter = self._find(name)
        if keep_alive is not None:
            entry.keep_alive = keep_alive
        leases = LEASES.get()
        if leases is not None:  # leased before any wait: nothing unloads it from here on
            entry.leases += 1
            leases.append(entry)
        await self._ensure_loaded(entry)
        assert entry.served is not None
        return entry.served, adapter

    def _find(self, name: Optional[str]) -> tuple[ModelEntry, Optional[str]]:
        if name is None:
            return self._default(), None
        entry = self._entries.get(name)
        if entry is not None:
            return entry, None
        for entry in self._entries.values():  # an adapter: runtime-loaded on a loaded model, or configured
            loras = entry.served.engine.loras if entry.served is not None else None
            if loras is not None and loras.get(name) is not None:
                return entry, name
            if any(adapter == name for adapter, _ in entry.spec.settings.lora_pairs()):
                return entry, name
        raise model_not_found(name)

    def _default(self) -> ModelEntry:
        """The model of a request that names none: the first loaded one, else the first known."""
        loaded = [e for e in self._entries.values() if e.state == "loaded"]
        return loaded[0] if loaded else next(iter(self._entries.values()))

    def check_serving(self) -> None:
        if self.state == "loading" and self.catalog.single:
            raise unavailable("The model is still loading; retry shortly.", retry_after=5)
        if self.state in ("failed", "stopped"):
            raise unavailable(f"The model is not available ({self.error or self.state}).")

    def _not_loaded(self, entry: ModelEntry) -> APIError:
        if entry.state == "error":
            return unavailable(f"model '{entry.name}' is not available: {entry.error}")
        if entry.state == "unloaded":
            return unavailable(f"model '{entry.name}' is not loaded: a request for it, or POST /models/load, loads it")
        return unavailable(f"model '{entry.name}' is {entry.state}; retry shortly", retry_after=5)

    def release(self, entry: ModelEntry) -> None:
        """A request leasing `entry` ended (ModelLeases)."""
        entry.leases = max(0, entry.leases - 1)
        entry.last_used = time.monotonic()
        if entry.leases == 0 and entry.expires_at() is not None and entry.expires_at() <= entry.last_used:
            self._wake_keeper()  # keep_alive 0: unloaded once its engine is done too

    # ------------------------------------------------------------------------------ load / unload

    async def load(self, name: str) -> ModelEntry:
        """POST /models/load: load `name` (again, after an error) if it is not loaded."""
        self.check_serving()
        entry = self.entry(name)
        if entry.state == "error":
            entry.state, entry.error = "unloaded", None
        entry.last_used = time.monotonic()
        await self._ensure_loaded(entry)
        return entry

    async def unload(self, name: str) -> ModelEntry:
        """POST /models/unload: unload `name` once its requests are done; 409 while it has some."""
        entry = self.entry(name)
        if entry.state == "loading" and entry.loading is not None:
            await asyncio.shield(entry.loading)
        if entry.state != "loaded":
            return entry
        if entry.busy:
            unfinished = entry.served.engine.num_unfinished if entry.served is not None else 0
            raise APIError(409, f"model '{name}' has {max(unfinished, entry.leases)} requests in flight; unload it "
                                "once they finish (or let keep_alive unload it when idle)", "invalid_request_error",
                           "model", "model_busy")
        await self._unload(entry, "asked to")
        return entry

    async def _ensure_loaded(self, entry: ModelEntry) -> None:
        while True:
            if entry.state == "loaded":
                return
            if entry.state == "error":
                raise self._not_loaded(entry)
            if entry.state == "unloading" or entry.loading is not None:
                await asyncio.shield(entry.loading) if entry.loading is not None else await asyncio.sleep(0.05)
                continue
            entry.loading = asyncio.get_running_loop().create_future()
            try:
                await self._load(entry)
            finally:
                loading, entry.loading = entry.loading, None
                if not loading.done():
                    loading.set_result(None)

    async def _load(self, entry: ModelEntry) -> None:
        async with self._room:
            if entry.cost is None and self._estimator is not None:
                try:
                    entry.cost = await in_daemon_thread(lambda: self._estimator(entry.spec), "quantserve-estimate")
                except (ValueError, OSError) as exc:  # the model cannot be read: loading would fail the same way
                    entry.state, entry.error = "error", _reason(exc)
                    logger.error("model '%s' cannot be loaded: %s", entry.name, entry.error)
                    raise self._not_loaded(entry) from None
                except Exception as exc:  # noqa: BLE001 - a gap in the estimate must not stop a model that loads
                    logger.warning("model '%s': no memory estimate (%s: %s)", entry.name, type(exc).__name__, exc)
            await self._make_room(entry)
            entry.state = "loading"
            entry.loads += 1
            alone = not self.models()
            started = time.monotonic()
            logger.info("loading model '%s'%s", entry.name,
                        "" if entry.cost is None else f" ({_gib(entry.cost.total_bytes)} estimated)")
            try:
                served = await in_daemon_thread(lambda: self._loader(entry.spec, self._workers(entry.spec)),
                                                 "quantserve-loader", background=not alone)
                await served.engine.start()
            except asyncio.CancelledError:
                entry.state = "unloaded"
                raise
            except BaseException as exc:  # noqa: BLE001 - even SystemExit from the loader thread is a failed load
                entry.state, entry.error = "error", _reason(exc)
                if isinstance(exc, (ValueError, OSError)):  # the loader's one-line errors: a bad model or path
                    logger.error("loading model '%s' failed: %s", entry.name, entry.error)
                    logger.debug("loading the model failed", exc_info=True)
                else:  # anything else may be a bug: keep the traceback in the log
                    logger.exception("loading model '%s' failed: %s", entry.name, entry.error)
                raise self._not_loaded(entry) from None
            entry.served, entry.state, entry.error = served, "loaded", None
            entry.load_seconds = time.monotonic() - started
            entry.last_used = time.monotonic()
            logger.info("model '%s' loaded in %.1f s", entry.name, entry.load_seconds)

    async def _make_room(self, entry: ModelEntry) -> None:
        """Unload least recently used idle models until `entry` fits the count and the budget."""
        need = entry.cost.total_bytes if entry.cost is not None else 0
        budget = self.budget_bytes
        if budget is not None and need > budget:
            raise APIError(507, f"model '{entry.name}' needs {_gib(need)} (weights {_gib(entry.cost.weight_bytes)}, "
                                f"KV cache {_gib(entry.cost.kv_cache_bytes)}) but the models' memory budget is "
                                f"{_gib(budget)} (--models-memory)", "insufficient_storage", "model", "model_too_large")
        while True:
            loaded = [e for e in self._entries.values() if e.state == "loaded"]
            used = sum(e.cost.total_bytes for e in loaded if e.cost is not None)
            over_count = self.max_loaded is not None and len(loaded) + 1 > self.max_loaded
            over_memory = budget is not None and used + need > budget
            if not over_count and not over_memory:
                return
            idle = sorted((e for e in loaded if not e.busy), key=lambda e: e.last_used)
            if not idle:
                busy = ", ".join(f"'{e.name}'" for e in loaded)
                why = (f"{len(loaded)} models are loaded (--models-max {self.max_loaded})" if over_count else
                       f"the loaded models take {_gib(used)} of the {_gib(budget)} budget and '{entry.name}' needs "
                       f"{_gib(need)}")
                raise unavailable(f"cannot load '{entry.name}' now: {why}, and every loaded model ({busy}) has "
                                  "requests in flight; retry when one is idle", retry_after=5)
            await self._unload(idle[0], "to make room for '%s'" % entry.name)

    async def _unload(self, entry: ModelEntry, why: str) -> None:
        served = entry.served
        entry.state = "unloading"
        logger.info("unloading model '%s' (%s)", entry.name, why)
        try:
            if served is not None:
                await served.engine.shutdown()
                served.close()
        finally:
            entry.served = None
            entry.state = "unloaded"
            entry.keep_alive = None
            entry.unloads += 1
            del served
            await in_daemon_thread(give_back_memory, "quantserve-unload")

    # ------------------------------------------------------------------------------ keep-alive, health

    def _wake_keeper(self) -> None:
        self._keeper_wake.set()

    async def _keep(self) -> None:
        """Unload expired idle models; mark models whose engine died (the one-model server's
        watchdog stops the process instead)."""
        while self.state == "ready":
            now = time.monotonic()
            for entry in list(self._entries.values()):
                if entry.state != "loaded" or entry.served is None:
                    continue
                alive, reason = entry.served.engine.health()
                if not alive and not self.catalog.single:
                    logger.error("model '%s' stopped serving: %s", entry.name, reason)
                    served, entry.served = entry.served, None
                    entry.state, entry.error = "error", f"its engine stopped: {reason}"
                    await served.engine.shutdown()
                    continue
                expires = entry.expires_at()
                if expires is not None and expires <= now and not entry.busy and not self._room.locked():
                    await self._unload(entry, "idle past its keep_alive")
            try:
                await asyncio.wait_for(self._keeper_wake.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            self._keeper_wake.clear()

    def health(self) -> tuple[bool, str]:
        """(serving, reason). A one-model server serves while its model's engine lives (unloaded by
        POST /models/unload or its keep_alive, it loads again on the next request); a registry of
        several serves while it runs (each model's state is in /v1/models)."""
        if self.state != "ready":
            return False, self.error or self.state
        if self.catalog.single:
            for served in self.models():
                alive, error = served.engine.health()
                if not alive:
                    return False, f"engine for '{served.name}' stopped: {error}"
            entry = next(iter(self._entries.values()))
            if entry.state == "error":
                return False, entry.error or "loading the model failed"
        return True, "ok"


def _gib(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def _reason(exc: BaseException) -> str:
    """One line naming the cause: the loader's ValueError/OSError messages say it themselves;
    other exceptions (MemoryError, torch's OutOfMemoryError, bugs) also need their type."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return f"not enough memory to load the model ({type(exc).__name__}{': ' + text if text else ''})"
    if isinstance(exc, (ValueError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
