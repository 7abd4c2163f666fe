"""Peak process RSS and device memory reached inside a `with` block (measures model loading).

    with PeakMemory(device) as mem:
        ...
    mem.rss_before, mem.peak_rss, mem.rss_after, mem.device_peak   (bytes; None when unknown)

On Linux the kernel's RSS high-water mark (VmHWM) is reset on entry (/proc/self/clear_refs), so
the peak is exact and covers only the block; elsewhere the peak is the process lifetime's
(getrusage), which is flagged by `peak_rss_is_lifetime`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import resource
import sys
from typing import Callable, Optional

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> Optional[int]:
    """Resident set size of this process in bytes (None where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def _vm_hwm() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_vm_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS counter (Linux >= 4.0)
        return True
    except OSError:
        return False


def _lifetime_peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Measure peak RSS (and peak CUDA memory when `device` is a CUDA device) over a block."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = device
        self.rss_before: Optional[int] = None
        self.rss_after: Optional[int] = None
        self.peak_rss: Optional[int] = None
        self.peak_rss_is_lifetime = False
        self.device_before: Optional[int] = None
        self.device_after: Optional[int] = None
        self.device_peak: Optional[int] = None

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> "PeakMemory":
        if self._cuda():
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_before = torch.cuda.memory_allocated(self.device)
        release_free_memory()  # a baseline without freed-but-retained heap that the block could reuse
        self.peak_rss_is_lifetime = not _reset_vm_hwm()
        self.rss_before = current_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_after = current_rss()
        hwm = None if self.peak_rss_is_lifetime else _vm_hwm()
        if hwm is None:
            self.peak_rss_is_lifetime = True
            hwm = _lifetime_peak_rss()
        self.peak_rss = hwm
        if self._cuda():
            torch.cuda.synchronize(self.device)
            self.device_after = torch.cuda.memory_allocated(self.device)
            self.device_peak = torch.cuda.max_memory_allocated(self.device)


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc malloc_trim; a no-op elsewhere).

    Streaming a checkpoint frees one multi-MiB buffer per tensor between the small long-lived
    allocations that stay behind (packed weights, statistics); glibc keeps such freed heap
    memory, so without this RSS would grow by about twice the quantized size during a load.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
