"""The engine's 16-bit output head on CPU (linear16.cpp, next to this file): float32 rows times a
bfloat16 weight, float32 sums and float32 output.

Built on first use by kernels/cpu/build.py: without a C++ compiler `linear_bf16` returns None and
the caller computes the same product with torch; a failed build raises.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .build import NativeLibrary

_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "qs16_abi_version": (_I, []),
    # x, T, K, w, V, bias or NULL, out, bf16 products, threads
    "qs16_linear": (_I, [_P, _L, _L, _P, _L, _P, _P, _I, _I]),
}


_LIB = NativeLibrary("linear16.cpp", _SIGNATURES, ("qs16_abi_version", 1), "computing with torch")
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


def bf16_products_allowed() -> bool:
    """torch's float32 matmul precision lets CPU matmuls use bf16 products ("medium"), as the
    4-bit kernels read it (quant/backends/cpu.py)."""
    try:
        return torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    except AttributeError:  # torch without the per-backend precision API
        return torch.get_float32_matmul_precision() == "medium"


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                bf16_products: Optional[bool] = None) -> Optional[torch.Tensor]:
    """x [..., K] float32 (CPU) times weight [V, K] bfloat16 -> [..., V] float32 (+ bias [V], any
    float dtype). bf16_products None: as torch's float32 matmul precision says. None when the
    kernel is unavailable or the arguments are not ones it takes."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != torch.float32 \
            or weight.dtype != torch.bfloat16 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return None
    lib = load()
    if lib is None:
        return None
    if bf16_products is None:
        bf16_products = bf16_products_allowed()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    out = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float32)
    rc = lib.qs16_linear(x2.data_ptr(), x2.shape[0], x2.shape[1], w.data_ptr(), w.shape[0],
                         None if b is None else b.data_ptr(), out.data_ptr(), int(bool(bf16_products)),
                         torch.get_num_threads())
    return out.view(*x.shape[:-1], w.shape[0]) if rc == 0 else None
