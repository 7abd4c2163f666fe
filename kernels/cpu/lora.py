"""LoRA deltas of a mixed-adapter batch on CPU (lora.cpp, next to this file): one call per fused
linear adds every row's adapter delta in place.

Built on first use by kernels/cpu/build.py: without a C++ compiler `load()` is None and the caller
computes the same with torch; a failed build raises.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple, Optional

import torch

from .build import NativeLibrary

_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "qslora_abi_version": (_I, []),
    # x, n, K, ldx, out, ldo, slot (int32), slots, table (int64 [parts, 6]), parts, bf16 weights, threads
    "qslora_add": (_I, [_P, _L, _L, _L, _P, _L, _P, _L, _P, _L, _I, _I]),
}

_LIB = NativeLibrary("lora.cpp", _SIGNATURES, ("qslora_abi_version", 3), "computing with torch")
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


class Table(NamedTuple):
    """One fused linear's adapters as the kernel reads them: `entries` [parts, 6] int64 (slot, A
    and Bt pointers, r, start, end), the number of slots, and whether the weights are bfloat16
    (else float32). `keep` holds the tensors the pointers point into."""

    entries: torch.Tensor
    slots: int
    bf16: bool
    keep: tuple


def table(slots: list[list[tuple[torch.Tensor, torch.Tensor, int, int]]]) -> Table:
    """The kernel's table for one fused linear: slots[q] = the parts of slot q's adapter there,
    each (A [r, K], Bt [r, end - start], start, end), contiguous CPU tensors, all float32 or all
    bfloat16; parts of one slot on disjoint columns. ValueError for weights it does not take."""
    rows, dtypes, keep = [], set(), []
    for q, parts in enumerate(slots):
        for a, b_t, start, end in parts:
            dtypes.update((a.dtype, b_t.dtype))
            if not (a.is_contiguous() and b_t.is_contiguous()) or a.device.type != "cpu" \
                    or b_t.device.type != "cpu" or a.dim() != 2 or a.shape[0] != b_t.shape[0] \
                    or b_t.shape[1] != end - start:
                raise ValueError("lora table: A and Bt must be contiguous CPU matrices of matching rank")
            rows.append([q, a.data_ptr(), b_t.data_ptr(), a.shape[0], start, end])
            keep += [a, b_t]
    if not dtypes <= {torch.float32} and dtypes != {torch.bfloat16}:
        raise ValueError(f"lora table: weights must be all float32 or all bfloat16, not {sorted(map(str, dtypes))}")
    return Table(torch.tensor(rows, dtype=torch.int64).view(-1, 6), len(slots), dtypes == {torch.bfloat16},
                 tuple(keep))


def add(lib: ctypes.CDLL, x: torch.Tensor, out: torch.Tensor, slot: torch.Tensor, table: Table,
        threads: Optional[int] = None) -> bool:
    """out[t, start:end] += (x[t] @ A^T) @ Bt for each part of slot[t]'s adapter, in place, for x
    [n, K] and out [n, M] float32 CPU with unit column stride, slot [n] int32 (-1: none); on
    torch's thread count unless told. False if the kernel refused the arguments (nothing written)."""
    rc = lib.qslora_add(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), out.stride(0),
                        slot.data_ptr(), table.slots, table.entries.data_ptr(), table.entries.shape[0],
                        int(table.bf16), torch.get_num_threads() if threads is None else threads)
    return rc == 0
