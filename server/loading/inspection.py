"""What a loaded model is made of: per layer (type, quantized or kept and why, shape, bytes) and
totals against the 16-bit size and the format's theoretical bits per parameter.

    print(format_inspection(load_model(LoadConfig("folder"))))
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from quantserve.quant import Linear4bit, Linear8bitLt, QuantConfig

from .loader import LoadResult
from .peak_memory import current_rss
from .weight_stream import linear_like_modules

# The per-weight data, not tables/metadata (4-bit: packed bytes and absmax; 8-bit: int8 rows and SCB).
_STAT_KEYS = ("weight", "weight.absmax", "weight.nested_absmax", "SCB")


@dataclasses.dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    status: str  # "quantized" | "kept" | "tied"
    why: str
    shape: tuple[int, ...]
    nbytes: int


def theory_bits_per_param(quant: QuantConfig, in_features: Optional[int] = None) -> float:
    """4 bits per weight plus its share of the block statistics: one float32 absmax per block,
    or with double quantization one 8-bit code per block plus one float32 per 256 blocks.
    LLM.int8: 8 bits plus one float32 scale per row of `in_features` weights (~8.06 for 576)."""
    if quant.load_in_8bit:
        return 8 + 32 / in_features if in_features else 8.0
    bs = quant.blocksize
    if quant.bnb_4bit_use_double_quant:
        return 4 + 8 / bs + 32 / (bs * 256)
    return 4 + 32 / bs


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def layer_rows(result: LoadResult) -> list[LayerRow]:
    """One row per module that holds tensors of its own, in model order. Tied tensors count once."""
    model, report = result.model, result.report
    linears = linear_like_modules(model)
    seen: dict[int, str] = {}
    rows = []
    for name, module in model.named_modules():
        own = {k: v for k, v in module._parameters.items() if v is not None}
        own.update({k: v for k, v in module._buffers.items() if v is not None and k not in module._non_persistent_buffers_set})
        if not own:
            continue
        if isinstance(module, Linear4bit) and module.quant_state is not None:
            state = module.quant_state
            tensors = {}
            module._save_to_state_dict(tensors, "", keep_vars=True)
            dq = ", double quant" if state.nested is not None else ""
            why = f"{state.quant_type}, blocksize {state.blocksize}{dq}"
            if name in report.transposed:
                why += ", Conv1D weight transposed"
            nbytes = sum(_tensor_bytes(t) for t in tensors.values())
            rows.append(LayerRow(name, "Linear4bit", "quantized", why, tuple(state.shape), nbytes))
            continue
        if isinstance(module, Linear8bitLt) and module.weight.int8_quantized:
            tensors = {}
            module._save_to_state_dict(tensors, "", keep_vars=True)
            why = f"int8 rows + float32 row scales, outlier threshold {module.threshold:g}"
            if name in report.transposed:
                why += ", Conv1D weight transposed"
            nbytes = sum(_tensor_bytes(t) for t in tensors.values())
            rows.append(LayerRow(name, "Linear8bitLt", "quantized", why, tuple(module.weight.shape), nbytes))
            continue
        weight = own.get("weight", next(iter(own.values())))
        tied_to = seen.get(id(weight))
        for tensor in own.values():
            seen.setdefault(id(tensor), name)
        if tied_to is not None:
            why = f"shares its weight with {tied_to}"
            if name in report.skipped:
                why = f"{report.skipped[name]}; {why}"
            rows.append(LayerRow(name, type(module).__name__, "tied", why, tuple(weight.shape), 0))
            continue
        why = report.skipped.get(name) if name in linears else f"not a Linear layer (stays in {str(report.dtype).removeprefix('torch.')})"
        if module is model.get_input_embeddings() or module is model.get_output_embeddings():
            role = "input embedding" if module is model.get_input_embeddings() else report.skipped.get(name, "output head")
            why = f"{role}; {str(weight.dtype).removeprefix('torch.')}: embeddings and head stay at 16 bits"
        nbytes = sum(_tensor_bytes(t) for t in own.values())
        rows.append(LayerRow(name, type(module).__name__, "kept", why or "", tuple(weight.shape), nbytes))
    return rows


def _decoded_absmax_growth(result: LoadResult) -> int:
    """Bytes the engine's native path adds by decoding double-quantized absmax (8-bit codes and
    nested statistics, replaced by one float32 per block); 0 where it would not serve natively."""
    from quantserve.server.engine.models.families import unsupported_reason

    if unsupported_reason(result.model) is not None:
        return 0
    growth = 0
    codes: set[int] = set()  # the nested code table may be one tensor shared by every layer
    for module in result.model.modules():
        state = module.quant_state if isinstance(module, Linear4bit) else None
        if state is not None and state.nested is not None:
            growth += state.absmax.numel() * 4 - _tensor_bytes(state.absmax) - _tensor_bytes(state.nested.absmax)
            if id(state.nested.code) not in codes:
                codes.add(id(state.nested.code))
                growth -= _tensor_bytes(state.nested.code)
    return growth


def _mib(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 2**20:,.1f} MiB"


def format_inspection(result: LoadResult, per_layer: bool = True) -> str:
    report = result.report
    rows = layer_rows(result)
    lines = [f"model      {report.source}", f"folder     {report.folder}"]
    q = report.quant
    if q is None:
        how = "none (unquantized)"
    elif q.load_in_8bit:
        how = (
            f"int8 (LLM.int8), outlier threshold {q.llm_int8_threshold:g}, compute in the activations' dtype"
            + (" (prequantized checkpoint)" if report.prequantized else "")
        )
    else:
        compute = str(q.bnb_4bit_compute_dtype or report.dtype).removeprefix("torch.")
        storage = str(q.bnb_4bit_quant_storage).removeprefix("torch.")
        how = (
            f"{q.bnb_4bit_quant_type}, blocksize {q.blocksize}, double quant {'on' if q.bnb_4bit_use_double_quant else 'off'}, "
            f"compute {compute}, storage {storage}" + (" (prequantized checkpoint)" if report.prequantized else "")
        )
    lines += [
        f"checkpoint {report.checkpoint_format}",
        f"device     {report.device}, dtype {str(report.dtype).removeprefix('torch.')}",
        f"quant      {how}",
    ]
    if per_layer:
        width = max([len(r.name) for r in rows] + [5])
        lines.append("")
        lines.append(f"{'layer':<{width}}  {'type':<14} {'status':<9} {'shape':<14} {'bytes':>12}  why")
        for r in rows:
            shape = "x".join(str(d) for d in r.shape)
            lines.append(f"{r.name:<{width}}  {r.type:<14} {r.status:<9} {shape:<14} {r.nbytes:>12,}  {r.why}")
        lines.append("")
    quantized = [r for r in rows if r.status == "quantized"]
    n_q = sum(torch.Size(r.shape).numel() for r in quantized)
    core = 0
    for name in (r.name for r in quantized):
        tensors: dict = {}
        result.model.get_submodule(name)._save_to_state_dict(tensors, "", keep_vars=True)
        core += sum(_tensor_bytes(tensors[k]) for k in _STAT_KEYS if k in tensors)
    q_bytes = sum(r.nbytes for r in quantized)
    kept_bytes = sum(r.nbytes for r in rows if r.status == "kept")
    lines.append(f"parameters {report.num_params:,} (16-bit size {_mib(report.weight_bytes_16bit)})")
    if quantized and q is not None:
        bits = 8 * core / n_q
        if q.load_in_8bit:
            # One float32 scale per output row: the theory weighs each layer's in_features.
            theory = sum(torch.Size(r.shape).numel() * theory_bits_per_param(q, r.shape[1]) for r in quantized) / n_q
            basis = "8 bits + a float32 scale per row"
        else:
            theory = theory_bits_per_param(q)
            stats = "8-bit absmax + fp32 per 256 blocks" if q.bnb_4bit_use_double_quant else "fp32 absmax"
            basis = f"blocksize {q.blocksize} with {stats}"
        lines.append(
            f"quantized  {len(quantized)} layers, {n_q:,} params in {_mib(q_bytes)}: {bits:.3f} bits/param "
            f"(theory {theory:.3f} for {basis}: {bits / theory:.4f}x); "
            f"code tables and metadata {q_bytes - core:,} bytes"
        )
    lines.append(f"kept       {sum(r.status == 'kept' for r in rows)} layers in {_mib(kept_bytes)}")
    ratio = report.weight_bytes_16bit / report.weight_bytes if report.weight_bytes else float("nan")
    lines.append(
        f"footprint  {_mib(report.weight_bytes)} vs 16-bit {_mib(report.weight_bytes_16bit)}: {ratio:.2f}x smaller"
    )
    decoded = _decoded_absmax_growth(result)
    if decoded:
        serving = report.weight_bytes + decoded
        lines.append(
            f"serving    {_mib(serving)} resident on the native path ({_mib(decoded)} more: it decodes the "
            f"double-quantized absmax to float32 once, for its fused matmuls), "
            f"{report.weight_bytes_16bit / serving:.2f}x smaller than 16-bit"
        )
    if report.device.type == "cuda":
        now = torch.cuda.memory_allocated(report.device)
        lines.append(
            f"device     {report.device}: load allocated {_mib(report.device_bytes)} (peak {_mib(report.device_peak_bytes)}); "
            f"allocated now {_mib(now)}"
        )
    if report.rss_before is not None and report.rss_after is not None and report.peak_rss is not None:
        scope = "process lifetime" if report.peak_rss_is_lifetime else "during load"
        lines.append(
            f"host RSS   grew {_mib(report.rss_after - report.rss_before)} during load "
            f"(peak {_mib(report.peak_rss)} {scope}, {_mib(report.peak_rss - report.rss_before)} above the start); "
            f"now {_mib(current_rss())}"
        )
    lines.append(f"load time  {report.load_seconds:.1f} s")
    lines += format_quant_cost(report, per_layer)
    return "\n".join(lines)


def _num(value: Optional[float], spec: str) -> str:
    return "null" if value is None else format(value, spec)


def format_quant_cost(report, per_layer: bool = True) -> list[str]:
    """What quantizing cost, as measured while loading (quant_stats.py): per layer and in sum."""
    stats = getattr(report, "layer_stats", None) or []
    if not stats:
        return []
    s = report.quantization_summary()
    lines = [""]
    if per_layer:
        width = max(len(st.name) for st in stats)
        lines.append(f"{'quantized layer':<{width}}  {'format':<6} {'bits/param':>10} {'rel error':>10} "
                     f"{'absmax':>9} {'outliers':>9}")
        for st in stats:
            lines.append(f"{st.name:<{width}}  {st.format:<6} {st.bits_per_param:>10.3f} {_num(st.rel_error, '>10.5f')} "
                         f"{st.absmax:>9.4g} {st.outlier_fraction:>9.3%}")
        lines.append("")
    if s["has_original"]:
        where = f" ({s['rel_error_max_layer']})" if per_layer else ""
        error = (f"relative error (Frobenius) mean {s['rel_error_mean']:.5f}, max {s['rel_error_max']:.5f}{where}, "
                 f"all layers together {s['rel_error_overall']:.5f}")
    else:
        error = "relative error unknown: " + s.get("note", "no original weights for some layers")
    lines.append(f"error      {error}")
    lines.append(
        f"weights    absmax {s['absmax_max']:.4g}, outliers (|w| > {s['outlier_threshold_rms']:g} x the layer's RMS) "
        f"{s['outlier_fraction_mean']:.4%} of weights on average; {s['bits_per_param']:.3f} bits/param achieved; "
        f"measuring took {s['stats_seconds']:.2f} s of the load"
    )
    return lines
