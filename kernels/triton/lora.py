"""Triton kernels for LoRA on a batch whose rows use different adapters (punica's BGMV shape).

    lora_shrink(x [T, K], a [L, R, K], idx [T]) -> y float32 [T, R]:   y[t] = a[idx[t]] @ x[t]
    lora_expand(y [T, R], b [L, N, R], idx [T], scale [L], out [T, M], offset)
        out[t, offset:offset+N] += scale[idx[t]] * (b[idx[t]] @ y[t])

a and b stack the adapters' matrices per slot (ranks padded with zeros to R); idx[t] = -1 marks a
row without adapter (left untouched). One program per (row, output tile): a decode batch mixes
adapters row by row, so no two rows share a weight tile and grouping buys nothing on a GPU;
sums in float32. The engine calls them on CUDA (server/engine/models/lora_layers.py, one shrink and
one expand per fused linear); tested under TRITON_INTERPRET=1 against a float64 reference, also
through the engine's LoRA layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def lora_shrink_kernel(x_ptr, a_ptr, idx_ptr, y_ptr, K, R, stride_xt, stride_al, stride_ar, stride_yt,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(idx_ptr + t).to(tl.int64)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + t * stride_xt + rk, mask=rk < K, other=0.0).to(tl.float32)
            w = tl.load(a_ptr + slot * stride_al + rr[:, None] * stride_ar + rk[None, :],
                        mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + t * stride_yt + rr, acc, mask=rr < R)


@triton.jit
def lora_expand_kernel(y_ptr, b_ptr, idx_ptr, scale_ptr, out_ptr, N, R, offset, stride_yt, stride_bl, stride_bn,
                       stride_ot, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(idx_ptr + t).to(tl.int64)
    if slot >= 0:
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            y = tl.load(y_ptr + t * stride_yt + rr, mask=rr < R, other=0.0)
            w = tl.load(b_ptr + slot * stride_bl + rn[:, None] * stride_bn + rr[None, :],
                        mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
            acc += tl.sum(w * y[None, :], axis=1)
        scale = tl.load(scale_ptr + slot)
        dst = out_ptr + t * stride_ot + offset + rn
        old = tl.load(dst, mask=rn < N, other=0.0)
        tl.store(dst, (old.to(tl.float32) + acc * scale).to(old.dtype), mask=rn < N)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, block_r: int = 16,
                block_k: int = 64) -> torch.Tensor:
    """float32 [T, R]: each row's input times its adapter's A (rows with idx -1: zeros)."""
    T, K = x.shape
    L, R, K2 = a.shape
    if K2 != K or idx.shape != (T,):
        raise ValueError(f"lora_shrink: x {tuple(x.shape)}, a {tuple(a.shape)}, idx {tuple(idx.shape)} do not match")
    x, a = x.contiguous(), a.contiguous()
    y = torch.empty(T, R, dtype=torch.float32, device=x.device)
    if T:
        grid = (T, triton.cdiv(R, block_r))
        lora_shrink_kernel[grid](x, a, idx.to(torch.int32), y, K, R, x.stride(0), a.stride(0), a.stride(1),
                                 y.stride(0), BLOCK_R=block_r, BLOCK_K=block_k)
    return y


def lora_expand(y: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                offset: int = 0, block_n: int = 64, block_r: int = 16) -> torch.Tensor:
    """out[:, offset:offset+N] += scale[idx] * (y @ b[idx]^T) per row, in place; returns out."""
    T, R = y.shape
    L, N, R2 = b.shape
    if R2 != R or idx.shape != (T,) or out.shape[0] != T or offset + N > out.shape[1] or out.stride(1) != 1:
        raise ValueError(f"lora_expand: y {tuple(y.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)}, "
                         f"offset {offset} do not match")
    b = b.contiguous()
    if T:
        grid = (T, triton.cdiv(N, block_n))
        lora_expand_kernel[grid](y.float().contiguous(), b, idx.to(torch.int32), scale.float().contiguous(), out, N,
                                 R, offset, R, b.stride(0), b.stride(1), out.stride(0), BLOCK_N=block_n,
                                 BLOCK_R=block_r)
    return out
