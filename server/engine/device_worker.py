"""DeviceWorker: the one thread that owns a device and steps every engine on it.

Several models served on one device share it through this thread, not one thread each: threads
fighting for the same cores (or the same GPU queue) make every step slower and their order
random. The worker goes round the engines that have work, one step each per round (an engine's
step = take its inbox, run its embedding jobs, schedule -> run -> postprocess, deliver), so a
busy model's batch cannot starve another model's first token: that token waits at most one step
of each other busy model. With no work anywhere the thread sleeps on one event that every
engine sets when it is given work.

The device's CPU threads are the worker's too: one thread-count controller (cpu_load.py) for
the device, sampled between steps, not one per model.

An engine is prepared (warm-up, kernels tuned, CUDA graphs captured) on the thread that loads
it, off this one, then attached; a model loading meanwhile costs the serving ones only the cores
the loader takes (the registry runs it at the lowest CPU priority). An exception escaping an
engine's step loop kills that engine alone (it fails its own requests, health() says why);
the worker goes on with the others.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Protocol

import torch

from .cpu_load import CpuLoadFollower

logger = logging.getLogger(__name__)


class SteppedEngine(Protocol):
    """What the worker needs of an engine (engine_loop.EngineLoop provides it)."""

    def _wants_step(self) -> bool: ...  # work queued or running, or asked to stop

    def _tick(self) -> None: ...  # one round: inbox, embeddings, one step, delivery

    def _stop_requests(self) -> None: ...  # shutting down: end every request (abort), deliver

    def _die(self, exc: BaseException) -> None: ...  # the step loop raised: fail everything, mark dead

    @property
    def _stopping(self) -> bool: ...


class DeviceWorker:
    """One per device: a thread that steps its engines in turn (see the module docstring)."""

    def __init__(self, device: torch.device | str, follow_cpu_load: bool = False, name: Optional[str] = None) -> None:
        self.device = torch.device(device)
        self.follow_cpu_load = follow_cpu_load and self.device.type == "cpu"
        self.wake = threading.Event()
        self._engines: list[Any] = []
        self._lock = threading.Lock()  # guards _engines between attach/detach and the worker's rounds
        self._detached: dict[int, threading.Event] = {}
        self._thread: Optional[threading.Thread] = None
        self._name = name or f"quantserve-device-{self.device}"
        self._cpu_load: Optional[CpuLoadFollower] = None
        self.error: Optional[str] = None  # the worker thread itself died (a bug): every engine is dead

    # ------------------------------------------------------------------------------ callers' side

    def attach(self, engine: Any) -> threading.Event:
        """Start stepping `engine` (prepared already); the event is set once the worker has let it go
        (it stopped, or died)."""
        done = threading.Event()
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the device worker for {self.device} died: {self.error}")
            self._engines.append(engine)
            self._detached[id(engine)] = done
            if self._thread is None:  # none yet, or the last one ended with its last engine
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
        self.wake.set()
        return done

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def engines(self) -> list[Any]:
        with self._lock:
            return list(self._engines)

    def cpu_load_report(self) -> Optional[dict[str, object]]:
        """The thread-count controller's state for /health (None when the count is pinned)."""
        return None if self._cpu_load is None else self._cpu_load.report()

    # ------------------------------------------------------------------------------ worker thread

    def _main(self) -> None:
        from .model_runner import device_guard

        try:
            with device_guard(self.device):
                if self.follow_cpu_load:
                    self._cpu_load = CpuLoadFollower.for_current_threads()
                try:
                    self._rounds()
                finally:
                    if self._cpu_load is not None:
                        self._cpu_load.close()  # torch's thread count back to what the server started with
                        self._cpu_load = None
        except BaseException as exc:  # noqa: BLE001 - a bug in the worker itself: every engine dies
            logger.exception("device worker for %s died", self.device)
            with self._lock:
                self.error = repr(exc)
                engines, self._engines = self._engines, []
                self._thread = None
            for engine in engines:
                self._let_go(engine, exc)

    def _rounds(self) -> None:
        """Until the last engine is let go (a later attach starts a new thread)."""
        while True:
            if self._round():
                continue
            self.wake.clear()
            # Set after the clear by whoever gave an engine work: checked again before sleeping.
            if any(e._stopping or e._wants_step() for e in self.engines):
                continue
            with self._lock:
                if not self._engines:
                    self._thread = None
                    return
            self.wake.wait()

    def _round(self) -> bool:
        """One step of each engine with work; whether any had some. (A method of its own: its
        locals, the engines it stepped, are gone when it returns, so that an engine let go is
        not kept alive by a sleeping worker's frame.)"""
        did = False
        for engine in self.engines:
            if engine._stopping:
                self._let_go(engine, None)
                continue
            if not engine._wants_step():
                continue
            did = True
            if self._cpu_load is not None:
                self._cpu_load.maybe_update()  # returns at once unless its interval has passed
            try:
                engine._tick()
            except BaseException as exc:  # noqa: BLE001 - this engine dies; the others go on
                logger.exception("engine for %s died", getattr(engine, "model_name", "?"))
                self._let_go(engine, exc)
        return did

    def _let_go(self, engine: Any, exc: Optional[BaseException]) -> None:
        """Detach `engine`: stopped (its requests end with "abort") or died (they fail with exc)."""
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)
            done = self._detached.pop(id(engine), None)
        try:
            if exc is None:
                engine._stop_requests()
            else:
                engine._die(exc)
        finally:
            if done is not None:
                done.set()
