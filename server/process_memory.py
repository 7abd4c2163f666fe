"""The serving process's own memory: what it keeps resident besides the weights and the KV cache.

Measured with /proc/PID/smaps on the default model (2-core Xeon, 2026-11-30; a real `quantserve
serve` under bench/peers.py's 64-client load, one run each):
- glibc gives each thread that allocates under contention its own malloc arena (up to 8 per core),
  and a freed block goes back to its own arena only (the loader, the engine, the OpenMP workers and
  the HTTP layer's executor threads all allocate; at the peak smaps showed ten anonymous
  mappings of 36-63 MiB, glibc's 64 MiB arena heaps partly grown). With a float32 KV cache: peak 1,926 MiB
  with glibc's default, 1,795 MiB with two arenas.
- transformers' model classes import torch._dynamo, which imports Triton when it is installed
  (torch.utils._triton.has_triton_package): 66 MiB of libtriton.so mapped and resident, plus its
  Python modules, in a process that never runs a Triton kernel on a CPU.
Both together, bf16 KV cache (commit e00d9b0): peak RSS 1.70 -> 1.45 GB, after loading 741 -> 643 MiB.
Both are applied by `prepare_serving_process` before the model loads (serve.run).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import Any, Callable, Optional

logger = logging.getLogger("quantserve.server")

# mallopt's parameter number for the arena limit (glibc malloc.h: M_ARENA_MAX -8).
_M_ARENA_MAX = -8
# One arena for the main thread's brk heap plus one shared by every other thread: the engine thread
# and the HTTP threads allocate at once, so one would serialize them; more is what retains memory.
SERVING_MALLOC_ARENAS = 2


@functools.cache
def _mallopt() -> Optional[Callable[[int, int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no arenas to limit)
        return None


def limit_malloc_arenas(arenas: int = SERVING_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does) for threads that start afterwards.
    True when applied; False where the C library is not glibc. An explicit MALLOC_ARENA_MAX in the
    environment wins: it is the operator's choice."""
    if isinstance(arenas, bool) or not isinstance(arenas, int) or arenas < 1:
        raise ValueError(f"arenas must be an int >= 1, got {arenas!r}")
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = _mallopt()
    return mallopt is not None and mallopt(_M_ARENA_MAX, arenas) == 1


def triton_needed(device: Optional[str], attention_backend: str) -> bool:
    """Whether a server with these settings can run a Triton kernel: on a CUDA device (attention,
    4-bit matmuls, LoRA), or on a CPU under the interpreter (TRITON_INTERPRET=1, tests and
    --attention-backend triton). `device` None means CUDA when present, as the loader decides."""
    if os.environ.get("TRITON_INTERPRET") == "1" or attention_backend == "triton":
        return True
    if device is not None:
        return not device.strip().lower().startswith("cpu")
    import torch

    return torch.cuda.is_available()


def hide_triton() -> bool:
    """Make `import triton` fail in this process (sys.modules[name] = None, Python's documented way):
    torch then takes its no-Triton paths, as in a CPU-only install. True when hidden; False when
    Triton was already imported (too late to save anything)."""
    if sys.modules.get("triton") is not None:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


def prepare_serving_process(settings: Any) -> None:
    """Before loading: cap the malloc arenas and, where no Triton kernel can run, keep Triton out."""
    arenas = limit_malloc_arenas()
    logger.info("malloc arenas: %s", f"at most {SERVING_MALLOC_ARENAS}" if arenas
                else "as the C library or MALLOC_ARENA_MAX sets them")
    if not triton_needed(settings.device, settings.attention_backend) and hide_triton():
        logger.info("Triton kept out of this process: no Triton kernel runs on this device (saves ~70 MiB resident)")
