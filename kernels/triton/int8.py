"""Triton kernels for LLM.int8 on GPUs (the "cuda" key of quant/backends/triton.py).

    int8_quantize_rows(A, threshold, as_f16) -> (CA int8 [M, K], SCA float32 [M], mask bool [K])
    int8_gemm(CA, CB, SCA, SCB, bias, dtype) -> dtype(float(CA @ CB.T) * (SCA * SCB) * 6.200124e-05 + bias)
    int8_linear(A, CB, SCB, bias, ieee) -> A.dtype(float32(A @ CB.T) * (SCB * float32(1 / 127)) + bias)

The format and each rounding step are quant/ops.py's (bitsandbytes'): a row's scale is its absmax
without the outliers, q = round_half_even(a * ((1 / scale) * 127)) with NaN -> 0, the outlier
columns zero. The caller (quant/backends/triton.py) adds the outlier columns' 16-bit product with
torch's addmm. Importing this module imports triton; tests run it under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MM_DEQUANT_SCALE = tl.constexpr(6.200124e-05)  # quant.ops.INT8_MM_DEQUANT_SCALE (bitsandbytes' constant)
# 1.5 * 2^23: in float32, (v + M) - M rounds |v| < 2^22 to the nearest integer, ties to even.
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _load_row(a_ptr, rk, K, AS_F16: tl.constexpr):
    x = tl.load(a_ptr + rk, mask=rk < K, other=0.0)
    if AS_F16:
        x = x.to(tl.float16)  # round to nearest even, as torch's .to(torch.float16)
    return x.to(tl.float32)


@triton.jit
def int8_quantize_rows_kernel(
    a_ptr, mask_ptr, q_ptr, scale_ptr, K, stride_am, thr,
    THR_ON: tl.constexpr, AS_F16: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: its scale (absmax without the outliers), then its int8 codes."""
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * stride_am
    mx = tl.zeros((BLOCK_K,), dtype=tl.float32)
    nan = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        h = tl.abs(_load_row(a_row, rk, K, AS_F16))
        if THR_ON:
            h = tl.where(h >= thr, 0.0, h)  # an outlier counts as 0
        nan = nan | (h != h).to(tl.int32)  # NaN propagates to the scale, as torch's max
        mx = tl.maximum(mx, tl.where(h != h, 0.0, h))
    scale = tl.max(mx, axis=0)
    scale = tl.where(tl.max(nan, axis=0) > 0, float("nan"), scale)
    tl.store(scale_ptr + row, scale)
    r = tl.math.div_rn(1.0, scale) * 127.0  # torch's `127.0 / t`: the reciprocal, then times 127
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        v = _load_row(a_row, rk, K, AS_F16) * r
        v = (v + ROUND_MAGIC) - ROUND_MAGIC
        # NaN and +-inf become 0 (torch's float -> int8 on x86); outlier columns are 0 too.
        outlier = tl.load(mask_ptr + rk, mask=rk < K, other=0)
        v = tl.where((tl.abs(v) <= 127.0) & (outlier == 0), v, 0.0)
        tl.store(q_ptr + row * K + rk, v.to(tl.int8), mask=rk < K)


@triton.jit
def int8_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out tile [BLOCK_M, BLOCK_N]: exact int32 sums with tl.dot (int8 tensor cores), then the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(b_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    v = acc.to(tl.float32) * (sa[:, None] * sb[None, :])
    v = v * MM_DEQUANT_SCALE
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


INV_127 = tl.constexpr(7.874015718698502e-3)  # float32(1 / 127), as bitsandbytes' SCB * (1.0 / 127.0)


@triton.jit
def int8_linear_kernel(
    a_ptr, b_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """LLM.int8's default (weight-only) forward, out tile [BLOCK_M, BLOCK_N]: each int8 weight tile
    converted to the activations' dtype in registers (exact: |q| <= 127 fits bf16 and fp16), float32
    accumulation with tl.dot (16-bit tensor cores; float32 activations in IEEE float32 when IEEE,
    else TF32), then the row scale and the bias. No float copy of the weight."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        if IEEE:
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
    scale = tl.load(sb_ptr + rn, mask=rn < N, other=0.0) * INV_127
    v = acc * scale[None, :]
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_linear(
    A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor], ieee: bool,
    block_m: int = 32, block_n: int = 64, block_k: int = 64,
) -> torch.Tensor:
    """A [M, K] (float32/float16/bfloat16, rows contiguous) @ (CB [N, K] int8 * SCB / 127).T (+ bias
    in A's dtype) -> A's dtype. ieee: float32 activations multiplied in IEEE float32 (torch's
    "highest" precision), else TF32."""
    M, K = A.shape
    N = CB.shape[0]
    out = torch.empty((M, N), dtype=A.dtype, device=A.device)
    if M:
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        int8_linear_kernel[grid](A, CB, SCB, bias if bias is not None else SCB, out, M, N, K,
                                 HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n,
                                 BLOCK_K=block_k)
    return out


def _round_to(value: float, dtype: torch.dtype) -> float:
    """A Python number as a tensor of `dtype` holds it (torch compares in the tensor's dtype)."""
    return torch.tensor(float(value), dtype=torch.float32).to(dtype).item()


def int8_quantize_rows(
    A: torch.Tensor, threshold: float, as_f16: bool, block_k: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise int8 of A [M, K] (rows contiguous): (CA, SCA, outlier column mask [K]). as_f16: the
    values are rounded to float16 first (gemm_int8's activations), else taken in A's dtype."""
    M, K = A.shape
    compare = torch.float16 if as_f16 else A.dtype
    thr_on = threshold > 0.0
    thr = _round_to(threshold, compare) if thr_on else 0.0
    if thr_on:
        # The outlier columns over all rows, compared in the same dtype (one pass by torch).
        mask = (A.to(compare).abs() >= thr).any(dim=0)
    else:
        mask = torch.zeros(K, dtype=torch.bool, device=A.device)
    CA = torch.empty((M, K), dtype=torch.int8, device=A.device)
    SCA = torch.empty(M, dtype=torch.float32, device=A.device)
    if M:
        int8_quantize_rows_kernel[(M,)](A, mask, CA, SCA, K, A.stride(0), thr, THR_ON=thr_on, AS_F16=as_f16,
                                        BLOCK_K=min(block_k, triton.next_power_of_2(K)))
    return CA, SCA, mask


def int8_gemm(
    CA: torch.Tensor, CB: torch.Tensor, SCA: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor],
    dtype: torch.dtype, block_m: int = 32, block_n: int = 64, block_k: int = 64,
) -> torch.Tensor:
    """dtype(float(CA @ CB.T) * (SCA ⊗ SCB) * 6.200124e-05 + bias) for int8 CA [M, K], CB [N, K]."""
    M, K = CA.shape
    N = CB.shape[0]
    out = torch.empty((M, N), dtype=dtype, device=CA.device)
    if M:
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        int8_gemm_kernel[grid](CA, CB, SCA, SCB, bias if bias is not None else SCA, out, M, N, K,
                               HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
