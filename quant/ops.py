"""The op contract: torch.library schemas and fake (meta) implementations for every quant op.

Backends (`quant/backends/*`) only register kernels for these ops; PyTorch picks the kernel from
the tensors' device, and torch.compile traces through the fake implementations. Arguments are
validated in `quant.functional` before an op is called; the `torch._check`s here restate the
shape contract so that compiled graphs and opcheck see the same rules.

Layout facts shared by all ops (the bitsandbytes format):
- 4-bit values are packed two per byte, element 2i in the high nibble, 2i+1 in the low nibble;
  `packed` has shape [(n + 1) // 2 // itemsize, 1] and any dtype (quant_storage), read as bytes.
- Blocks of `blocksize` consecutive elements run across row boundaries (flat indexing).
- `absmax` is float32 [ceil(n / blocksize)].
"""

from __future__ import annotations

from math import prod
from typing import Optional, Sequence

import torch

NAMESPACE = "quant"

_lib = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 - the one owner of these schemas

_lib.define(
    "quantize_4bit(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)"
)
_lib.define(
    "dequantize_4bit(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
    "ScalarType dtype) -> Tensor"
)
_lib.define(
    "gemm_4bit(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, int blocksize, str quant_type, "
    "Tensor? bias=None) -> Tensor"
)
_lib.define("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)")
_lib.define(
    "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor"
)


def _num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def packed_rows(n: int, quant_storage: torch.dtype) -> int:
    """Rows of the [rows, 1] packed tensor holding n 4-bit values in `quant_storage`."""
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    return (n + 1) // (2 * itemsize)


@torch.library.register_fake(f"{NAMESPACE}::quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    n = A.numel()
    packed = torch.empty((packed_rows(n, quant_storage), 1), device=A.device, dtype=quant_storage)
    absmax = torch.empty((_num_blocks(n, blocksize),), device=A.device, dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake(f"{NAMESPACE}::dequantize_4bit")
def _(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
):
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    torch._check(A.numel() * A.element_size() * 2 >= prod(shape), lambda: "packed data too small for shape")
    return torch.empty(shape, device=A.device, dtype=dtype)


def _matmul_4bit_fake(A: torch.Tensor, shapeB: Sequence[int]) -> torch.Tensor:
    """The shape checks of both 4-bit matmuls, and their output: [..., out_features] in A's dtype."""
    torch._check(len(shapeB) == 2, lambda: f"shapeB must be (out_features, in_features), got {shapeB}")
    torch._check(
        A.shape[-1] == shapeB[1], lambda: f"A has {A.shape[-1]} input features, the weight {shapeB[1]}"
    )
    return torch.empty((*A.shape[:-1], shapeB[0]), device=A.device, dtype=A.dtype)


@torch.library.register_fake(f"{NAMESPACE}::gemm_4bit")
def _(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    bias: Optional[torch.Tensor] = None,
):
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    return _matmul_4bit_fake(A, shapeB)


@torch.library.register_fake(f"{NAMESPACE}::quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    out = torch.empty_like(A, dtype=torch.uint8)
    absmax = torch.empty((_num_blocks(A.numel(), blocksize),), device=A.device, dtype=torch.float32)
    return out, absmax


@torch.library.register_fake(f"{NAMESPACE}::dequantize_blockwise")
def _(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype):
    torch._check(A.dtype == torch.uint8, lambda: f"A must be uint8, got {A.dtype}")
    return torch.empty_like(A, dtype=dtype)


# The op for a 4-bit matmul whose absmax is double-quantized, decoded inside the kernel.
#
#     gemm_4bit_nested(A, B, shapeB, absmax, nested_absmax, nested_code, offset, blocksize,
#                      nested_blocksize, quant_type, bias) -> Tensor
#
# is, by definition, `gemm_4bit(A, B, shapeB, decoded, blocksize, quant_type, bias)` with
# `decoded = dequantize_blockwise(absmax, nested_absmax, nested_code, nested_blocksize) + offset`
# (float32): `absmax` holds the uint8 codes [num_blocks], `nested_absmax` float32
# [ceil(num_blocks / nested_blocksize)], `nested_code` the 256-entry float32 map, `offset` the mean
# that was subtracted before quantizing. GPU kernels decode absmax per tile in registers, reading one
# byte per block instead of four and skipping the separate decode launch and its float32 buffer.
#
# Its reference kernel (quant.backends.default, every device) is that definition, calling the two
# ops so that each runs on its device's best kernel.
_lib.define(
    "gemm_4bit_nested"
    "(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, Tensor nested_absmax, Tensor nested_code, float offset, "
    "int blocksize, int nested_blocksize, str quant_type, Tensor? bias=None) -> Tensor"
)


@torch.library.register_fake(f"{NAMESPACE}::gemm_4bit_nested")
def _(
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
):
    torch._check(absmax.dtype == torch.uint8, lambda: f"nested absmax codes must be uint8, got {absmax.dtype}")
    torch._check(
        nested_absmax.dtype == torch.float32, lambda: f"nested_absmax must be float32, got {nested_absmax.dtype}"
    )
    torch._check(nested_code.numel() == 256, lambda: f"nested_code must have 256 entries, got {nested_code.numel()}")
    return _matmul_4bit_fake(A, shapeB)


# ---- Autograd for the 4-bit matmuls (QLoRA): gradients for the activations and the bias; the 4-bit
# weight is frozen (integer bytes carry no gradient). As bitsandbytes' MatMul4Bit, the backward
# dequantizes this one layer's weight in the gradient's dtype, multiplies, and drops it: a float
# copy of one weight at a time, never of the whole model. Only the packed bytes and the absmax are
# saved for backward (they are the model's own tensors, not copies). ----


def _gemm_4bit_setup_context(ctx, inputs, output) -> None:
    A, B, shapeB, absmax, blocksize, quant_type, bias = inputs
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(B, absmax)
    ctx.shapeB, ctx.blocksize, ctx.quant_type = list(shapeB), blocksize, quant_type
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grad_bias(ctx, grad: torch.Tensor, bias_index: int) -> Optional[torch.Tensor]:
    # needs_input_grad leaves out trailing arguments left at their default (bias=None).
    if len(ctx.needs_input_grad) <= bias_index or not ctx.needs_input_grad[bias_index]:
        return None
    return grad.reshape(-1, grad.shape[-1]).sum(0, dtype=ctx.bias_dtype)


def _gemm_4bit_backward(ctx, grad: torch.Tensor):
    grad_A = None
    if ctx.needs_input_grad[0]:
        B, absmax = ctx.saved_tensors
        W = torch.ops.quant.dequantize_4bit(B, absmax, ctx.blocksize, ctx.quant_type, ctx.shapeB, grad.dtype)
        grad_A = torch.matmul(grad, W)  # [..., N] @ [N, K]
    return grad_A, None, None, None, None, None, _grad_bias(ctx, grad, 6)


def _gemm_4bit_nested_setup_context(ctx, inputs, output) -> None:
    A, B, shapeB, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, bias = inputs
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(B, absmax, nested_absmax, nested_code)
    ctx.shapeB, ctx.blocksize, ctx.quant_type = list(shapeB), blocksize, quant_type
    ctx.offset, ctx.nested_blocksize = offset, nested_blocksize
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gemm_4bit_nested_backward(ctx, grad: torch.Tensor):
    grad_A = None
    if ctx.needs_input_grad[0]:
        B, absmax, nested_absmax, nested_code = ctx.saved_tensors
        decoded = torch.ops.quant.dequantize_blockwise(
            absmax, nested_absmax, nested_code, ctx.nested_blocksize, torch.float32
        ) + ctx.offset
        W = torch.ops.quant.dequantize_4bit(B, decoded, ctx.blocksize, ctx.quant_type, ctx.shapeB, grad.dtype)
        grad_A = torch.matmul(grad, W)
    return (grad_A,) + (None,) * 9 + (_grad_bias(ctx, grad, 10),)


torch.library.register_autograd(
    f"{NAMESPACE}::gemm_4bit", _gemm_4bit_backward, setup_context=_gemm_4bit_setup_context
)
torch.library.register_autograd(
    f"{NAMESPACE}::gemm_4bit_nested", _gemm_4bit_nested_backward, setup_context=_gemm_4bit_nested_setup_context
)


# ---- Autocast for the 4-bit matmuls: inside torch.autocast the activations (and the bias) are cast
# to the autocast dtype, as torch does for F.linear and as bitsandbytes' matmul ends up doing; the
# packed weight and the float32 absmax statistics are left as they are (torch.library.register_autocast
# would cast every floating input, absmax included). The cast is differentiable, so gradients come
# back in the activations' own dtype. ----

_autocast_lib = torch.library.Library(NAMESPACE, "IMPL")  # noqa: TOR901 - autocast kernels only


def _register_4bit_autocast(op_name: str, device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = getattr(getattr(torch.ops, NAMESPACE), op_name).default
    bias_index = len(op._schema.arguments) - 1

    def kernel(_keyset, A, *rest):
        dtype = torch.get_autocast_dtype(device_type)
        rest = list(rest)
        if A.is_floating_point() and A.device.type == device_type:
            A = A.to(dtype)
            if len(rest) == bias_index and rest[-1] is not None:
                rest[-1] = rest[-1].to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(A, *rest)

    _autocast_lib.impl(op_name, kernel, key, with_keyset=True)


for _op_name in ("gemm_4bit", "gemm_4bit_nested"):
    for _device_type in ("cpu", "cuda"):
        _register_4bit_autocast(_op_name, _device_type)

# ------------------------------------------------------------------------------------------------
# LLM.int8 (bitsandbytes' 8-bit format, Linear8bitLt)
#
# - Row-wise absmax int8: for each row r of A [rows, K], SCB[r] = max|A[r]| (float32) and
#   CB[r, k] = round(A[r, k] * ((1 / SCB[r]) * 127)) as int8 (round half to even; NaN -> 0), in
#   float32 from A's own dtype, as bitsandbytes does (torch computes `127.0 / t` as a reciprocal
#   times 127: two roundings). Dequantize: CB * SCB * float32(1 / 127).
# - With threshold > 0, the elements with |a| >= threshold (compared in A's dtype) are outliers:
#   they are left out of their row's absmax, and every column holding one ("outlier column") is
#   zero in CB. `outlier_mask` is bool [K], True for the outlier columns (all False at threshold 0).
# - gemm_int8 is Linear8bitLt's forward (bitsandbytes' MatMul8bitLt, inference): the activations
#   are cast to float16 and quantized as above with the threshold; int8 x int8 -> int32 over all
#   columns; out = float32(acc) * (SCA[m] * SCB[n]) * 6.200124e-05 (+ bias cast to A's dtype),
#   rounded to A's dtype; then the outlier columns' contribution is added in A's dtype:
#   out.addmm(A[:, cols], dequantize(CB[:, cols], SCB).to(A.dtype).T). (6.200124e-05 is
#   bitsandbytes' CPU constant for 1 / 127^2, which it rounds 1.8e-5 high; kept for identical bytes.)
#   It is the opt-in (QuantConfig.llm_int8_activations, --int8-activations): quantizing the
#   activations costs ~0.5-0.9% relative error per matmul.
# - int8_linear is the default forward: the weight-only product A @ W.T (+ bias) with
#   W = CB * SCB * float32(1 / 127), the activations unquantized (bitsandbytes' CPU MatMul8bitFp).
#   Exact up to float rounding: at torch's "highest" float32 matmul precision the products and sums
#   are float32 (a kernel may factor the row scale out of the sum: (sum_k A[m,k] * CB[n,k]) * s[n]),
#   the result rounded once to A's dtype; at "high"/"medium" a kernel may round the activations to
#   bf16 (CB is exact in bf16), never coarser.
# ------------------------------------------------------------------------------------------------

INT8_MM_DEQUANT_SCALE = 6.200124e-05

_lib.define("int8_vectorwise_quant(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor)")
_lib.define("int8_vectorwise_dequant(Tensor A, Tensor stats) -> Tensor")
_lib.define("gemm_int8(Tensor A, Tensor CB, Tensor SCB, float threshold=0.0, Tensor? bias=None) -> Tensor")
_lib.define("int8_linear(Tensor A, Tensor CB, Tensor SCB, Tensor? bias=None) -> Tensor")


@torch.library.register_fake(f"{NAMESPACE}::int8_vectorwise_quant")
def _(A: torch.Tensor, threshold: float = 0.0):
    torch._check(A.dim() >= 1, lambda: "A must have at least one dimension")
    rows = A.numel() // A.shape[-1] if A.shape[-1] else 0
    CB = torch.empty(A.shape, device=A.device, dtype=torch.int8)
    SCB = torch.empty((rows,), device=A.device, dtype=torch.float32)
    mask = torch.empty((A.shape[-1],), device=A.device, dtype=torch.bool)
    return CB, SCB, mask


@torch.library.register_fake(f"{NAMESPACE}::int8_vectorwise_dequant")
def _(A: torch.Tensor, stats: torch.Tensor):
    torch._check(A.dtype == torch.int8, lambda: f"A must be int8, got {A.dtype}")
    torch._check(stats.dtype == torch.float32, lambda: f"stats must be float32, got {stats.dtype}")
    return torch.empty(A.shape, device=A.device, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::gemm_int8")
def _(A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float = 0.0, bias: Optional[torch.Tensor] = None):
    torch._check(CB.dtype == torch.int8, lambda: f"CB must be int8, got {CB.dtype}")
    torch._check(CB.dim() == 2, lambda: f"CB must be (out_features, in_features), got {tuple(CB.shape)}")
    torch._check(SCB.dtype == torch.float32, lambda: f"SCB must be float32, got {SCB.dtype}")
    torch._check(A.shape[-1] == CB.shape[1], lambda: f"A has {A.shape[-1]} input features, the weight {CB.shape[1]}")
    return torch.empty((*A.shape[:-1], CB.shape[0]), device=A.device, dtype=A.dtype)


@torch.library.register_fake(f"{NAMESPACE}::int8_linear")
def _(A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor] = None):
    torch._check(A.is_floating_point(), lambda: f"A must be a float tensor, got {A.dtype}")
    torch._check(CB.dtype == torch.int8, lambda: f"CB must be int8, got {CB.dtype}")
    torch._check(CB.dim() == 2, lambda: f"CB must be (out_features, in_features), got {tuple(CB.shape)}")
    torch._check(SCB.dtype == torch.float32, lambda: f"SCB must be float32, got {SCB.dtype}")
    torch._check(SCB.numel() == CB.shape[0], lambda: f"SCB must have {CB.shape[0]} row scales, got {SCB.numel()}")
    torch._check(A.dim() >= 1 and A.shape[-1] == CB.shape[1],
                 lambda: f"A has {A.shape[-1] if A.dim() else 0} input features, the weight {CB.shape[1]}")
    torch._check(bias is None or bias.numel() == CB.shape[0], lambda: f"bias must have {CB.shape[0]} values")
    return torch.empty((*A.shape[:-1], CB.shape[0]), device=A.device, dtype=A.dtype)


def _gemm_int8_setup_context(ctx, inputs, output) -> None:
    A, CB, SCB, _threshold, bias = inputs
    ctx.save_for_backward(CB, SCB)
    ctx.a_dtype = A.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gemm_int8_backward(ctx, grad: torch.Tensor):
    """Gradients for the activations and the bias (the int8 weight has none), as bitsandbytes'
    MatMul8bitLt: grad_A = grad @ (CB * SCB / 127) in A's dtype. Lets adapters train through
    frozen 8-bit layers."""
    CB, SCB = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        W = torch.Tensor.to(CB, ctx.a_dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))  # plain .to, not a subclass's
        grad_A = torch.matmul(grad.to(ctx.a_dtype), W)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=ctx.bias_dtype)
    return grad_A, None, None, None, grad_bias


torch.library.register_autograd(
    f"{NAMESPACE}::gemm_int8", _gemm_int8_backward, setup_context=_gemm_int8_setup_context
)


def _int8_linear_setup_context(ctx, inputs, output) -> None:
    A, CB, SCB, bias = inputs
    ctx.save_for_backward(CB, SCB)
    ctx.a_dtype = A.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _int8_linear_backward(ctx, grad: torch.Tensor):
    """As gemm_int8's (the same dequantized weight): grad_A = grad @ W; the bias' gradient."""
    CB, SCB = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        W = torch.Tensor.to(CB, ctx.a_dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
        grad_A = torch.matmul(grad.to(ctx.a_dtype), W)
    if len(ctx.needs_input_grad) > 3 and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=ctx.bias_dtype)
    return grad_A, None, None, grad_bias


torch.library.register_autograd(
    f"{NAMESPACE}::int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup_context
)
