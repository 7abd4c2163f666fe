"""The whole decoder stack of a Llama-style model in one native call per engine step (decode.cpp,
next to this file; server/engine/models/fused_step.py builds its plan and drives it).

Built on first use by kernels/cpu/build.py: without a C++ compiler `load()` is None and the engine
runs its Python forward; a failed build raises.

The structs below mirror decode.cpp's QsdLinear / QsdLayer / QsdStep field for field.
"""

from __future__ import annotations

import ctypes

from .build import NativeLibrary

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class Linear(ctypes.Structure):
    _fields_ = [("weight", _P), ("absmax", _P), ("code", _P), ("bias", _P), ("n", _L), ("k", _L),
                ("blocksize", _L), ("lora_table", _P), ("lora_parts", _L), ("lora_slots", _L), ("lora_bf16", _I)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), ("attn_eps", _F), ("mlp_eps", _F),
                ("q_norm", _P), ("k_norm", _P), ("q_eps", _F), ("k_eps", _F),
                ("qkv", Linear), ("o", Linear), ("up", Linear), ("down", Linear),
                ("heads", _L), ("kv_heads", _L), ("head_dim", _L), ("intermediate", _L), ("rope", _L),
                ("scale", _F), ("softcap", _F), ("window", _L), ("k_cache", _P), ("v_cache", _P)]


class Step(ctypes.Structure):
    _fields_ = [("x", _P), ("out", _P), ("work", _P), ("T", _L), ("hidden", _L), ("cos", _P), ("sin", _P),
                ("rot_dims", _P), ("slots", _P), ("seqs", _P), ("S", _L), ("tables", _P), ("block_size", _L), ("cache_dtype", _I),
                ("lora_slot", _P), ("final_norm", _P), ("final_eps", _F), ("bf16_products", _I), ("threads", _I),
                ("num_decodes", _L),
                ("gemm", _P), ("write_kv", _P), ("attention", _P), ("lora", _P), ("amx", _P)]


_SIGNATURES = {
    "qsd_abi_version": (_I, []),
    # T, hidden, max qkv width, max attention width, max intermediate
    "qsd_work_floats": (_L, [_L, _L, _L, _L, _L]),
    # layers, number of layers, step
    "qsd_forward": (_I, [_P, _L, _P]),
}

# -ffp-contract=off: rope's products and sums rounded one at a time, as torch computes them.
_LIB = NativeLibrary("decode.cpp", _SIGNATURES, ("qsd_abi_version", 4), "running the Python forward",
                     extra_flags=("-ffp-contract=off",))
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


def function_address(lib: ctypes.CDLL, name: str) -> int:
    """The address of an exported C function of a loaded library (to pass as a function pointer)."""
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
