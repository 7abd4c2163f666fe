"""Pure-PyTorch kernels for every quant op: the reference the other backends are tested against.

Registered for the CompositeExplicitAutograd key, so they serve any device that has no faster
kernel. Every step mirrors the format definition in `quant/ops.py` in float32, in the same order
of operations as bitsandbytes, so that the packed bytes and absmax match it bit for bit.
"""

from __future__ import annotations

from math import prod
from typing import Optional, Sequence

import torch

from ..codebooks import get_4bit_bounds, get_4bit_code
from ..ops import INT8_MM_DEQUANT_SCALE, NAMESPACE


def _scaled_blocks(
    A: torch.Tensor, blocksize: int, clamp_tail_absmax: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten A to float32, return (values scaled into [-1, 1], absmax per block)."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    full_blocks = flat[:full].reshape(-1, blocksize)
    absmax = full_blocks.abs().amax(dim=1) if full else flat.new_empty(0)
    # Full blocks multiply by the reciprocal; bitsandbytes does the same (x * (1 / absmax)).
    scaled = torch.clamp(full_blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if rem:
        # The trailing partial block divides, and stores its absmax clamped to 1e-38.
        tail_absmax = flat[full:].abs().amax()
        tail_divisor = tail_absmax.clamp(min=1e-38)
        absmax = torch.cat([absmax, (tail_divisor if clamp_tail_absmax else tail_absmax).reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_divisor, -1, 1)])
    return scaled, absmax


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    midpoints, order = get_4bit_bounds(quant_type, A.device)
    scaled, absmax = _scaled_blocks(A, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # 0.0 pads to the zero code
    # Nearest code: count of midpoints strictly below the value (a tie goes to the lower code;
    # NaN sorts past every midpoint, to the largest code, as in bitsandbytes).
    q = order[torch.bucketize(scaled, midpoints)]
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.reshape(-1).view(quant_storage).unsqueeze(1)
    return packed, absmax


def unpack_4bit(A: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes (any storage dtype) -> int64 codes [n], high nibble first."""
    b = A.reshape(-1).view(torch.uint8)
    codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (float32 [n]) * absmax[i // blocksize], in float32."""
    n = values.numel()
    rem = n % blocksize
    full = n - rem
    out = (values[:full].reshape(-1, blocksize) * absmax[: full // blocksize].unsqueeze(1)).reshape(-1)
    if rem:
        out = torch.cat([out, values[full:] * absmax[full // blocksize]])
    return out


def dequantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    n = prod(shape)
    code = get_4bit_code(quant_type, A.device)
    values = code[unpack_4bit(A, n)]
    return _scale_blocks(values, absmax, blocksize).to(dtype).reshape(shape)


def gemm_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    W = dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, A.dtype)
    return torch.nn.functional.linear(A, W, None if bias is None else bias.to(A.dtype))


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """8-bit: exact nearest entry of the sorted `code` table (ties to the lower entry).

    bitsandbytes' CPU library stores the absmax of every block unclamped here (an all-zero
    block keeps absmax 0), so the tail block is not clamped either.
    """
    scaled, absmax = _scaled_blocks(A, blocksize, clamp_tail_absmax=False)
    midpoints = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return q.reshape(A.shape), absmax


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    values = code[A.reshape(-1).long()]
    return _scale_blocks(values, absmax, blocksize).to(dtype).reshape(A.shape)


for _name, _fn in {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "gemm_4bit": gemm_4bit,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
}.items():
    torch.library.register_kernel(f"{NAMESPACE}::{_name}", "CompositeExplicitAutograd")(_fn)


def decode_absmax(
    absmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: float, nested_blocksize: int
) -> torch.Tensor:
    """float32 absmax [num_blocks] from its 8-bit codes (quant.functional.dequantize_absmax's arithmetic)."""
    decoded = torch.ops.quant.dequantize_blockwise(absmax, nested_absmax, nested_code, nested_blocksize, torch.float32)
    return decoded + offset


def gemm_4bit_nested(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: float,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    decoded = decode_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return torch.ops.quant.gemm_4bit(A, B, shapeB, decoded, blocksize, quant_type, bias)


torch.library.register_kernel(f"{NAMESPACE}::gemm_4bit_nested", "CompositeExplicitAutograd")(gemm_4bit_nested)


# ---- LLM.int8 (see the format in quant/ops.py); the same torch operations, in the same order, as
# bitsandbytes 0.50's default backend, so every byte and every rounding matches it. ----


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    K = A.shape[-1]
    A2 = A.reshape(-1, K)
    mask = torch.zeros(K, dtype=torch.bool, device=A.device)
    if threshold > 0.0:
        outliers = A2.abs() >= threshold  # compared in A's dtype, as bitsandbytes does
        mask = outliers.any(dim=0)
        A2 = A2.masked_fill(outliers, 0)  # outliers are left out of their row's absmax
    row_stats = A2.abs().amax(dim=1).float()  # NaN propagates, as torch.max does
    # float32 product of A's values and (1 / absmax) * 127 (torch's `127.0 / t`); NaN (an all-zero
    # row: 0 * inf) -> 0.
    out = torch.round(A2 * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    out.masked_fill_(mask, 0)  # the outlier columns are computed in 16 bits instead
    return out.reshape(A.shape), row_stats, mask


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    A2 = A.reshape(stats.numel(), A.shape[-1])  # one scale per row (also for an empty column set)
    # Times the float32 reciprocal of 127, as bitsandbytes (not a division).
    return (A2 * stats.view(-1, 1) * 7.874015718698502e-3).reshape(A.shape)


def gemm_int8(
    A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float = 0.0, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    N, K = CB.shape
    A2 = A.reshape(-1, K)
    CA, SCA, mask = int8_vectorwise_quant(A2.to(torch.float16), threshold)
    # Exact int32 sums: float64 holds every partial sum of int8 products (|sum| < 2^53).
    acc = (CA.double() @ CB.double().T).to(torch.int32)
    out = acc * (SCA.unsqueeze(1) * SCB.unsqueeze(0)) * INT8_MM_DEQUANT_SCALE
    if bias is not None:
        out = out + bias.to(A.dtype)  # added in float32, before rounding to A's dtype
    out = out.to(A.dtype)
    if threshold > 0.0 and bool(mask.any()):
        cols = torch.argwhere(mask).view(-1)
        sub_weight = int8_vectorwise_dequant(CB[:, cols].contiguous(), SCB).to(A.dtype).t()
        out = out.addmm(A2[:, cols], sub_weight)
    return out.reshape(*A.shape[:-1], N)


def int8_linear(
    A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The weight-only forward: F.linear with the dequantized weight CB * (SCB * float32(1 / 127)).

    bitsandbytes' MatMul8bitFp dequantizes into A's dtype; for 16-bit activations that rounds
    every weight to 8 (bf16) or 11 (fp16) bits, so here the weight and the sums stay float32 and
    only the result is rounded to A's dtype, unless torch's float32 matmul precision is below
    "highest", where bitsandbytes' own formula (the weight in A's dtype) is within what that
    precision allows and halves the memory traffic on GPUs.
    """
    exact = A.dtype == torch.float32 or torch.get_float32_matmul_precision() == "highest"
    dtype = torch.float32 if exact else A.dtype
    W = CB.to(dtype).mul_(SCB.to(dtype if exact else torch.float32).unsqueeze(1).mul(1.0 / 127.0).to(dtype))
    out = torch.nn.functional.linear(A.to(dtype), W, None if bias is None else bias.to(dtype))
    return out.to(A.dtype)


for _name, _fn in {
    "int8_vectorwise_quant": int8_vectorwise_quant,
    "int8_vectorwise_dequant": int8_vectorwise_dequant,
    "gemm_int8": gemm_int8,
    "int8_linear": int8_linear,
}.items():
    torch.library.register_kernel(f"{NAMESPACE}::{_name}", "CompositeExplicitAutograd")(_fn)
