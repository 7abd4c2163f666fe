"""The engine's int8 output head on CPU (linear8.cpp, next to this file): float32 rows times a
symmetric per-row int8 weight (weight-only), float32 sums and float32 output.

Built on first use by kernels/cpu/build.py: without a C++ compiler `linear_int8` returns None and
the caller computes the same product with torch; a failed build raises.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .build import NativeLibrary

_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "qs8_abi_version": (_I, []),
    "qs8_has_avx512": (_I, []),
    # x, T, K, w, scale, V, bias or NULL, out, force portable, threads
    "qs8_linear": (_I, [_P, _L, _L, _P, _P, _L, _P, _P, _I, _I]),
}

_LIB = NativeLibrary("linear8.cpp", _SIGNATURES, ("qs8_abi_version", 1), "computing with torch")
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


def has_avx512() -> bool:
    lib = load()
    return lib is not None and bool(lib.qs8_has_avx512())


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                portable: bool = False) -> Optional[torch.Tensor]:
    """x [..., K] float32 (CPU) times weight [V, K] int8 with float32 row scales [V] -> [..., V]
    float32: out = scale * (x . weight^T) (+ bias [V], any float dtype). portable: the portable
    loop even where AVX-512 runs. None when the kernel is unavailable or the arguments are not
    ones it takes."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != torch.float32 \
            or weight.dtype != torch.int8 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] \
            or scale.dtype != torch.float32 or scale.shape != (weight.shape[0],) or weight.shape[1] == 0 \
            or (bias is not None and bias.numel() != weight.shape[0]):
        return None
    lib = load()
    if lib is None:
        return None
    # Every tensor whose pointer is passed stays bound to a name until the call returns.
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w, s = weight.contiguous(), scale.contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    out = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float32)
    rc = lib.qs8_linear(x2.data_ptr(), x2.shape[0], x2.shape[1], w.data_ptr(), s.data_ptr(), w.shape[0],
                        None if b is None else b.data_ptr(), out.data_ptr(), int(bool(portable)),
                        torch.get_num_threads())
    return out.view(*x.shape[:-1], w.shape[0]) if rc == 0 else None
