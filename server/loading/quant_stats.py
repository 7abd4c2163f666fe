"""What quantizing cost, per layer, measured while the weights stream in.

For every quantized Linear the loader hands over the float weight it has just quantized (it
passes through anyway) and the quantized parameter; `layer_stats` compares them:

- rel_error: ||W - dequant(Q(W))||_F / ||W||_F;
- absmax: max |W|; outlier_fraction: share of weights with |W| > OUTLIER_RMS x the layer's RMS
  (the heavy tail 4-bit blocks and int8 rows have to stretch their scale over);
- bits_per_param: the bytes the layer's data actually takes (packed codes and their scales:
  absmax, nested absmax, or int8 rows and SCB) x 8 / weights.

On CPU (float32) one kernel pass (kernels/cpu/quant_error.cpp) sums W^2 and (W - dequantized)^2
without materializing the dequantized weight; a layer larger than SAMPLE_ELEMENTS is measured on
every k-th block or row (`sampled_fraction` says how much; ||W|| and the RMS are then estimates
from the same sample). Elsewhere the dequantized weight is rebuilt a chunk of whole blocks (or
rows) at a time, so the check adds at most CHUNK_ELEMENTS floats to the loader's peak memory. A prequantized checkpoint has no
original: its rel_error is None (unknown, not zero) and absmax / outliers describe the stored,
dequantized weights (`has_original` says which).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Optional

import torch

from quantserve.quant.functional import dequantize_absmax

OUTLIER_RMS = 6.0  # |w| beyond this many RMS of its layer counts as an outlier
CHUNK_ELEMENTS = 1 << 20  # dequantized floats held at once (4 MiB in float32)
# A group whose stored scale is at least this share of the threshold is read: double-quantized
# absmax codes are within ~1% of the true absmax (8-bit dynamic map), float16 SCB within 0.05%.
_MARGIN = 0.9
# On CPU the error of a layer larger than this is measured on every k-th block (or row), evenly
# spread, this many weights at least: a ratio estimate whose spread is ~0.5% of rel_error, at a
# fraction of the cost of a pass over a large layer (measured: bench/quant_stats_cost.py).
SAMPLE_ELEMENTS = 1 << 18
_INV_127 = 7.874015718698502e-3  # the float32 reciprocal bitsandbytes multiplies int8 rows by


@dataclasses.dataclass(frozen=True)
class LayerQuantStats:
    """One quantized layer's figures (see the module docstring). `format`: nf4 / fp4 / int8."""

    name: str
    format: str
    shape: tuple[int, int]  # (out_features, in_features)
    bits_per_param: float
    rel_error: Optional[float]  # None: no original to compare with (prequantized checkpoint)
    absmax: float
    outlier_fraction: float
    frobenius_norm: float = 0.0  # ||W||_F of the original (or of the stored weights without one)
    double_quant: bool = False
    blocksize: Optional[int] = None  # 4-bit only
    has_original: bool = True
    sampled_fraction: float = 1.0  # share of the weights rel_error (and the RMS) was measured on

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        return out


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _chunks_4bit(param: Any) -> tuple[int, Any]:
    """(element count, iterator of (start, end, dequantized flat chunk)) of a Params4bit."""
    state = param.quant_state
    n = state.shape.numel()
    packed = param.data.reshape(-1).view(torch.uint8)
    absmax = dequantize_absmax(state)  # float32 per block (decoded once when double-quantized)
    bs = state.blocksize
    step = max(bs, CHUNK_ELEMENTS // bs * bs)

    def chunks():
        for start in range(0, n, step):
            end = min(start + step, n)
            part = torch.ops.quant.dequantize_4bit(
                packed[start // 2 : (end + 1) // 2], absmax[start // bs : -(-end // bs)], bs, state.quant_type,
                [end - start], torch.float32,
            )
            yield start, end, part

    return n, chunks()


def _chunks_int8(param: Any) -> tuple[int, Any]:
    CB, SCB = param.data, param.SCB
    rows, cols = CB.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))

    def chunks():
        for r in range(0, rows, step):
            end = min(r + step, rows)
            # int8_vectorwise_dequant's products in its order (CB * SCB, then * 1/127), in place
            part = CB[r:end].to(torch.float32).mul_(SCB[r:end].view(-1, 1)).mul_(_INV_127)
            yield r * cols, end * cols, part.reshape(-1)

    return rows * cols, chunks()


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU for these short passes: with two OpenMP threads on a busy 2-core
    machine every parallel region waits for a descheduled thread (measured: 88 ms instead of 2.5 ms
    for a 1536x576 layer). Process-wide for a few milliseconds, while the loader runs alone."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sampled_elements(n: int, group: int, stride: int) -> int:
    """Weights in every `stride`-th group of `group` (the last group may be short)."""
    groups = -(-n // group)
    picked = -(-groups // stride)
    last = (picked - 1) * stride  # index of the last group visited
    return (picked - 1) * group + min(group, n - last * group)


def _native_sums(param: Any, flat: torch.Tensor, scales: torch.Tensor, stride: int) -> Optional[tuple[float, float]]:
    """(sum W^2, sum (W - dequantized)^2) over every `stride`-th block (4-bit) or row (int8), from
    the CPU kernel; None where it does not apply."""
    if flat.device.type != "cpu" or flat.dtype != torch.float32:
        return None
    from quantserve.kernels.cpu import quant_error

    state = getattr(param, "quant_state", None)
    if state is not None:
        packed = param.data.reshape(-1).view(torch.uint8)
        return quant_error.error_4bit(flat.contiguous(), packed, scales.contiguous(), state.code, state.blocksize, stride)
    return quant_error.error_int8(flat.reshape(param.data.shape).contiguous(), param.data, param.SCB, stride)


def _tail_stats(flat: torch.Tensor, scales: torch.Tensor, group: int, threshold: float) -> tuple[float, int]:
    """(max |w|, count of |w| > threshold) of the original weights, read only where they can be:
    in the groups (4-bit blocks, int8 rows) whose scale -- their absmax, as quantizing computed it;
    decoded from 8 bits with double quantization, so within a few percent -- comes near the
    threshold or the largest scale. Outliers are rare: that is a small fraction of the weights."""
    n = flat.numel()
    full = n // group
    scales = scales.reshape(-1).float()
    limit = _MARGIN * min(threshold, float(scales.max()))
    picked = torch.nonzero(scales[:full] >= limit).reshape(-1)
    parts = [flat[: full * group].view(full, group).index_select(0, picked.to(flat.device)).reshape(-1)]
    if full * group < n:  # a last, partial block
        parts.append(flat[full * group :])
    values = torch.cat(parts).float().abs_()
    if values.numel() == 0:
        return 0.0, 0
    return float(values.max()), int(torch.count_nonzero(values > threshold))


def layer_stats(name: str, param: Any, original: Optional[torch.Tensor]) -> LayerQuantStats:
    with _one_thread(param.device):
        return _layer_stats(name, param, original)


def _layer_stats(name: str, param: Any, original: Optional[torch.Tensor]) -> LayerQuantStats:
    """Compare a quantized parameter (Params4bit, or a quantized Int8Params) with the float weight
    it was made from (`original`, [out, in] in any float dtype), or, without one, describe the
    stored weights alone."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        n, chunks = _chunks_4bit(param)
        shape = tuple(state.shape)
        fmt, bs, dq = state.quant_type, state.blocksize, state.nested is not None
        stored = _nbytes(param.data) + _nbytes(state.absmax) + (_nbytes(state.nested.absmax) if dq else 0)
        scales, group = dequantize_absmax(state), bs
    else:
        n, chunks = _chunks_int8(param)
        shape = tuple(param.data.shape)
        fmt, bs, dq = "int8", None, False
        stored = _nbytes(param.data) + _nbytes(param.SCB)
        scales, group = param.SCB, shape[1]
    with torch.no_grad():
        if original is not None:
            flat = original.detach().reshape(-1)
            if flat.numel() != n:
                raise ValueError(f"{name}: original has {flat.numel()} elements, the quantized weight {n}")
            stride = max(1, n // SAMPLE_ELEMENTS)  # groups (blocks or rows) apart: n / stride weights measured
            if state is not None and shape[1] % group == 0:
                # blocks tile rows: a stride sharing a factor with the blocks per row would visit
                # the same columns in every row (columns often differ in scale)
                while math.gcd(stride, shape[1] // group) != 1:
                    stride -= 1
            sums = _native_sums(param, flat, scales, stride)
            if sums is not None:  # one pass over the original and the codes (kernels/cpu/quant_error.cpp)
                sum_sq, err_sq = sums
                sampled = _sampled_elements(n, group, stride)
                sum_sq *= n / sampled  # the whole layer's ||W||^2, estimated from the sample
                err_sq *= n / sampled
            else:
                # Four passes: ||W||, dequantize, subtract, norm (float32 sums within a chunk, which
                # torch sums pairwise; Python floats across chunks).
                sum_sq = float(torch.linalg.vector_norm(flat, dtype=torch.float32)) ** 2
                err_sq = 0.0
                for start, end, deq in chunks:
                    err_sq += float(torch.linalg.vector_norm(deq.sub_(flat[start:end]), dtype=torch.float32)) ** 2
                sampled = n
            threshold = OUTLIER_RMS * math.sqrt(sum_sq / n)
            rel_error = math.sqrt(err_sq / sum_sq) if sum_sq > 0 else 0.0
            absmax, outliers = _tail_stats(flat, scales, group, threshold)
        else:  # the stored weights are all there is: two passes over them, never all at once
            absmax, sum_sq = 0.0, 0.0
            for _, _, deq in chunks:
                absmax = max(absmax, float(deq.abs_().max()))
                sum_sq += float(torch.linalg.vector_norm(deq, dtype=torch.float32)) ** 2
            threshold = OUTLIER_RMS * math.sqrt(sum_sq / n)
            _, chunks = _chunks_4bit(param) if state is not None else _chunks_int8(param)
            outliers = sum(int(torch.count_nonzero(deq.abs_() > threshold)) for _, _, deq in chunks)
            rel_error, sampled = None, n
    return LayerQuantStats(
        name=name, format=fmt, shape=shape, bits_per_param=8 * stored / n, rel_error=rel_error,
        absmax=absmax, outlier_fraction=outliers / n, frobenius_norm=math.sqrt(sum_sq), double_quant=dq, blocksize=bs,
        has_original=original is not None, sampled_fraction=sampled / n,
    )


def summarize(stats: list[LayerQuantStats], seconds: float = 0.0) -> dict[str, Any]:
    """The whole model in one object: /v1/models/{id}'s `quantization`, the report's `summary`.
    Means over layers are plain means; `rel_error_overall` is the Frobenius error of all quantized
    weights taken together, `bits_per_param` weighs every weight equally."""
    formats = sorted({s.format for s in stats})
    params = sum(s.shape[0] * s.shape[1] for s in stats)
    known = [s for s in stats if s.rel_error is not None]
    out: dict[str, Any] = {
        "layers": len(stats),
        "format": formats[0] if len(formats) == 1 else ("mixed" if formats else None),
        "double_quant": any(s.double_quant for s in stats),
        "blocksize": next((s.blocksize for s in stats if s.blocksize is not None), None),
        "quantized_params": params,
        "bits_per_param": sum(s.bits_per_param * s.shape[0] * s.shape[1] for s in stats) / params if params else None,
        "has_original": bool(stats) and len(known) == len(stats),
        "rel_error_mean": sum(s.rel_error for s in known) / len(known) if known else None,
        "rel_error_max": max((s.rel_error for s in known), default=None),
        "rel_error_max_layer": max(known, key=lambda s: s.rel_error).name if known else None,
        "absmax_max": max((s.absmax for s in stats), default=None),
        "outlier_fraction_mean": sum(s.outlier_fraction for s in stats) / len(stats) if stats else None,
        "outlier_threshold_rms": OUTLIER_RMS,
        "error_sampled_fraction": sum(s.sampled_fraction * s.shape[0] * s.shape[1] for s in known) / sum(
            s.shape[0] * s.shape[1] for s in known) if known else None,
        "stats_seconds": round(seconds, 4),
    }
    norms_sq = sum(s.frobenius_norm**2 for s in known)
    out["rel_error_overall"] = (
        math.sqrt(sum((s.rel_error * s.frobenius_norm) ** 2 for s in known) / norms_sq) if known and norms_sq else None
    )
    if stats and not known:
        out["note"] = "prequantized checkpoint: no original weights, so no quantization error (rel_error is null)"
    return out
