"""The threads models are priced, loaded and unloaded on (registry.py): daemon threads, at the
lowest priority while other models serve."""

from __future__ import annotations

import asyncio
import atexit
import gc
import os
import sys
import threading
from typing import Any, Callable, Optional

BACKGROUND_SWITCH_INTERVAL = 0.0005  # seconds: the GIL switch interval while a model loads beside serving ones


async def in_daemon_thread(fn: Callable[[], Any], name: str, background: bool = False) -> Any:
    """fn() in a daemon thread. Not asyncio.to_thread: a process asked to stop while loading
    (SIGTERM) would wait at exit for the executor's thread to finish loading, for minutes.
    background: while other models serve, at the lowest CPU priority (nice 19: under autogroup a
    thread's nice weighs against the threads of its own process) and with one compute thread (a
    second OpenMP pool beside the device worker's would slow every one of its steps)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if future.done():  # cancelled: nobody wants the result any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        import torch

        result, error = None, None
        threads, switch = torch.get_num_threads(), sys.getswitchinterval()
        try:
            if background:
                lower_this_thread()
                # A loader running Python holds the GIL for up to the switch interval (5 ms) each
                # time the device worker or the event loop asks for it, many times a step: asked
                # to hand it over ten times sooner, it delays them ten times less.
                sys.setswitchinterval(min(switch, BACKGROUND_SWITCH_INTERVAL))
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        finally:
            from quantserve.kernels.cpu import paged_attention as native

            native.release_openmp_threads()  # this thread's OpenMP pool is not needed any more
            if background:  # torch keeps the last count set as the default of threads started later
                torch.set_num_threads(threads)
                sys.setswitchinterval(switch)
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the event loop has closed: the server stopped meanwhile
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


def lower_this_thread() -> None:
    """The lowest CPU priority and one compute thread for the calling thread (see in_daemon_thread)."""
    import torch

    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
        # SCHED_IDLE: runs only on a core nothing else of normal priority wants (a nice-19 thread
        # still gets slices beside the device worker's OpenMP threads, and each one stalls a region).
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(1)


def freeze_loaded_objects() -> None:
    """After a load: collect, then move every object alive out of the cyclic collector's reach.

    A model's modules, its tensors' Python objects and its tokenizer live as long as it does, and a
    full (generation 2) collection while serving walks all of them with the GIL held, every stream
    waiting: 8 full collections of up to 232 ms each in one default-model engine benchmark run.
    Frozen, they are skipped (vLLM freezes after startup too); freeing by reference count still
    works, and an unload unfreezes first so that the model's cycles are collected. At exit they
    are unfrozen again: the interpreter's last collection then frees them as before (frozen, the
    native extensions' objects among them are reported as leaks, nanobind's on stderr)."""
    gc.collect()
    gc.freeze()


atexit.register(gc.unfreeze)  # see freeze_loaded_objects; a no-op when nothing was frozen


def give_back_memory() -> None:
    """After an unload: collect the model's cycles and hand the freed heap back to the OS."""
    gc.unfreeze()
    freeze_loaded_objects()  # the other models' objects go back out of the collector's way
    from ..loading.peak_memory import release_free_memory

    release_free_memory()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
