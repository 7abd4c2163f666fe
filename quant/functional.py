"""Public 4-bit functions, mirroring bitsandbytes.functional: validate, then call the ops.

    packed, state = quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    W_hat = dequantize_4bit(packed, state)
    y = matmul_4bit(x, packed, state, bias)   # == F.linear(x, W_hat.to(x.dtype), bias)
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops as _ops  # noqa: F401 - defines the op schemas
from .backends import load_backends
from .codebooks import QUANT_TYPES, get_4bit_code, get_dynamic_map
from .state import NestedState, QuantState

load_backends()

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = tuple(2**i for i in range(5, 13))  # 32 .. 4096
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.int16, torch.float32, torch.int32)
NESTED_BLOCKSIZE = 256


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


def _check_float_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize A block-wise to 4 bits (NF4 or FP4), as bitsandbytes does.

    Args:
        A: float32/float16/bfloat16 tensor of any shape and element count.
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        quant_type: "nf4" or "fp4".
        compress_statistics: double quantization: store absmax as 8-bit codes in blocks of 256.
        quant_storage: dtype of the packed tensor (the same bytes, viewed).

    Returns:
        (packed [(n + 1) // (2 * itemsize), 1] tensor of quant_storage, QuantState).
    """
    _check_float_tensor("A", A)
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    if quant_storage not in STORAGE_DTYPES:
        raise TypeError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage}")
    if A.numel() == 0:
        raise ValueError("A must have at least one element")
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if (A.numel() + 1) // 2 % itemsize:
        raise ValueError(
            f"quant_storage={quant_storage} needs the packed byte count ({(A.numel() + 1) // 2}) "
            f"to be a multiple of {itemsize}"
        )
    packed, absmax = torch.ops.quant.quantize_4bit(A.contiguous(), blocksize, quant_type, quant_storage)
    nested = None
    if compress_statistics:
        absmax, nested = _compress_absmax(absmax)
    state = QuantState(
        absmax=absmax,
        shape=A.shape,
        dtype=A.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=get_4bit_code(quant_type, A.device),
        nested=nested,
    )
    return packed, state


def _compress_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, NestedState]:
    offset = absmax.mean()
    code = get_dynamic_map(absmax.device)
    q, nested_absmax = torch.ops.quant.quantize_blockwise(absmax - offset, code, NESTED_BLOCKSIZE)
    return q, NestedState(absmax=nested_absmax, code=code, offset=offset.item(), blocksize=NESTED_BLOCKSIZE)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax per block, decoding double quantization if the state has it."""
    if state.nested is None:
        return state.absmax
    nested = state.nested
    absmax = torch.ops.quant.dequantize_blockwise(
        state.absmax, nested.absmax, nested.code, nested.blocksize, torch.float32
    )
    return absmax + nested.offset


def _check_state(packed: torch.Tensor, state: QuantState) -> None:
    if not isinstance(state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(state).__name__}")
    _check_quant_type(state.quant_type)
    _check_blocksize(state.blocksize)
    if state.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quant_state.dtype must be float32, float16 or bfloat16, got {state.dtype}")
    n = state.shape.numel()
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        raise ValueError(
            f"packed tensor holds {packed.numel() * packed.element_size()} bytes, "
            f"shape {tuple(state.shape)} needs {(n + 1) // 2}"
        )


def dequantize_4bit(
    packed: torch.Tensor, quant_state: QuantState, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Undo `quantize_4bit`: a tensor of quant_state.shape in `dtype` (default: the original)."""
    _check_state(packed, quant_state)
    dtype = quant_state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return torch.ops.quant.dequantize_4bit(
        packed, dequantize_absmax(quant_state), quant_state.blocksize, quant_state.quant_type,
        list(quant_state.shape), dtype,
    )


def matmul_4bit(
    A: torch.Tensor, packed: torch.Tensor, quant_state: QuantState, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """A @ W.T + bias for a 4-bit W of shape (out_features, in_features), computed in A.dtype.

    Equal to F.linear(A, dequantize_4bit(packed, quant_state).to(A.dtype), bias) up to the
    summation order of the backend's kernel.
    """
    _check_float_tensor("A", A)
    _check_state(packed, quant_state)
    if len(quant_state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D weight, the state has shape {tuple(quant_state.shape)}")
    if A.shape[-1] != quant_state.shape[1]:
        raise ValueError(f"A has {A.shape[-1]} input features, the weight expects {quant_state.shape[1]}")
    if bias is not None and bias.shape != (quant_state.shape[0],):
        raise ValueError(f"bias must have shape ({quant_state.shape[0]},), got {tuple(bias.shape)}")
    nested = quant_state.nested
    if nested is not None:
        # GPU kernels decode the 8-bit absmax in registers; elsewhere the op decodes, then gemm_4bit.
        return torch.ops.quant.gemm_4bit_nested(
            A, packed, list(quant_state.shape), quant_state.absmax, nested.absmax, nested.code, nested.offset,
            quant_state.blocksize, nested.blocksize, quant_state.quant_type, bias,
        )
    return torch.ops.quant.gemm_4bit(
        A, packed, list(quant_state.shape), quant_state.absmax, quant_state.blocksize, quant_state.quant_type, bias
    )
