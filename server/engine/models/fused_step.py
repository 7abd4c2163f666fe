"""The decoder stack in one native call per step on CPU (kernels/cpu/decode.cpp): the "fused"
forward path, chosen at engine start (forward_path.py) for the models whose layers it covers.

Why: on the default model a single-stream decode step spent about half its time between kernels
(Python, torch's dispatcher, ctypes, OpenMP workers going back to sleep between ~300 small
regions): one call per step leaves the kernels. The call runs the same matmul, cache-write,
attention and LoRA kernels the Python path calls (through function pointers), so both paths
compute the same products; norms, rope and SiLU are per-row loops in decode.cpp.

Covered: pre-norm layers (transformers RMSNorms, as norms.py fuses them), separate or
fused q/k/v with or without per-head q/k RMSNorms (Qwen3), rotate-half rope (partial rotary,
per-layer-type ropes, NoPE layers), 4-bit linears (any bias), SiLU-gated MLP, paged attention with
windows and soft-capping, LoRA adapter rows; float32 activations, and any KV cache dtype the native
attention kernel reads. `reason()` says why a model is not covered; the engine then runs the
decoder layer by layer ("layers"). A step it cannot run is an error, never a quiet fallback.

The plan (one ctypes struct per layer pointing at the fused weights) is built once; a step fills
the Step struct: the embeddings, cos/sin per rope, the attention plan, the LoRA slots.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from quantserve.kernels.cpu import amx as amx_cpu
from quantserve.kernels.cpu import build as quant4_cpu
from quantserve.kernels.cpu import decode as native
from quantserve.kernels.cpu import lora as lora_cpu
from quantserve.kernels.cpu import paged_attention as attention_cpu
from quantserve.quant.backends import cpu as quant_cpu
from quantserve.quant.codebooks import get_4bit_code

from ..attention.native import NativeBackend

if TYPE_CHECKING:  # step_inputs imports this package
    from ..step_inputs import StepInputs

logger = logging.getLogger(__name__)

GROUPS = ("qkv", "o_proj", "up", "down")  # the fused linears of a layer, as lora_layers names them


def _base(layer: Any, group: str) -> Any:
    """A layer's fused linear, under its LoRA wrapper if it has one."""
    linear = getattr(layer, group)
    return getattr(linear, "base", linear)


def _silu(fn: Any) -> bool:
    return isinstance(fn, nn.SiLU) or type(fn).__name__ == "SiLUActivation"


def reason(model: Any, cache_dtype: torch.dtype) -> Optional[str]:
    """Why the fused step does not cover this DecoderModel with a `cache_dtype` KV cache (None: it does)."""
    from .norms import RMSNorm

    if not isinstance(model.attention, NativeBackend):
        return f"it calls the native attention kernel (the attention backend is {model.attention.name})"
    if attention_cpu.CACHE_DTYPE_CODES.get(cache_dtype) is None:
        return f"a {cache_dtype} KV cache"
    missing = [name for name, lib in (("decode", native.load()), ("q4_gemm", quant4_cpu.load()),
                                      ("paged attention", attention_cpu.load())) if lib is None]
    if missing:
        return f"the native {', '.join(missing)} kernels are not built (no compiler)"
    if not isinstance(model.norm, RMSNorm):
        return "the final norm is not a plain RMSNorm"
    for i, layer in enumerate(model.layers):
        if layer.attn_out is not None or layer.mlp_out is not None or layer.parallel:
            return f"layer {i}: not a pre-norm residual layer"
        if not isinstance(layer.attn_in, RMSNorm) or not isinstance(layer.mlp_in, RMSNorm):
            return f"layer {i}: a norm that is not a plain RMSNorm"
        if layer.neox:
            return f"layer {i}: GPT-NeoX q/k/v layout"
        if layer.q_norm is not None and not (layer.qk_norm_per_head and isinstance(layer.q_norm, RMSNorm)
                                             and isinstance(layer.k_norm, RMSNorm)):
            return f"layer {i}: q/k norms other than per-head RMSNorms"
        if not layer.gated or not _silu(layer.act_fn):
            return f"layer {i}: the MLP is not SiLU-gated"
        if layer.rope is not None and (layer.rope.dim > layer.head_dim or layer.rope.dim % 2):
            return f"layer {i}: rotary dims {layer.rope.dim} for head_dim {layer.head_dim}"
        for group in GROUPS:
            linear = _base(layer, group)
            state = getattr(linear, "state", None)
            if state is None or linear.int8 is not None or linear.compute_dtype != torch.float32 \
                    or linear.weight.device.type != "cpu":
                return f"layer {i}: {group} is not a 4-bit linear computing in float32 on CPU"
            if linear.bias is not None and linear.bias.dtype != torch.float32:
                return f"layer {i}: {group} has a {linear.bias.dtype} bias"
    return None


class FusedStep:
    """`__call__(step, kv_caches) -> final hidden [T, hidden]` for a model `reason()` found covered."""

    # What it holds besides the model's own tensors is step scratch, not weights: the weight count
    # (/v1/memory) does not walk it.
    holds_no_weights = True

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lib = native.load()
        # Intel AMX tiles for prompt rows, with bf16 products only (kernels/cpu/amx.cpp, decode.cpp's amx_split).
        amx_lib = amx_cpu.load() if amx_cpu.available() else None
        lora_lib = lora_cpu.load()
        # The kernels the native step calls, as function pointers (fixed for the process).
        self._kernels = dict(
            gemm=native.function_address(quant4_cpu.load(), "q4_gemm"),
            write_kv=native.function_address(attention_cpu.load(), "qs_write_kv"),
            attention=native.function_address(attention_cpu.load(), "qs_paged_attention"),
            amx=None if amx_lib is None else native.function_address(amx_lib, "qamx_gemm4"))
        self._lora_add = None if lora_lib is None else native.function_address(lora_lib, "qslora_add")
        self._layers: Optional[ctypes.Array] = None
        self._caches: Optional[tuple[int, ...]] = None  # the KV caches' addresses the plan points at (no reference)
        self._codes: dict[str, torch.Tensor] = {}  # the 16-entry code table per quant type the plan points at
        self._lora_key: Optional[tuple] = None
        self._work = torch.empty(0, dtype=torch.float32)
        self._ropes = list(dict.fromkeys(layer.rope for layer in model.layers if layer.rope is not None))

    # ------------------------------------------------------------------------------------- plan

    def _linear(self, linear: Any) -> native.Linear:
        state = linear.state
        code = self._codes.get(state.quant_type)
        if code is None:
            code = self._codes[state.quant_type] = get_4bit_code(state.quant_type).to(torch.float32).contiguous()
        n, k = state.shape
        return native.Linear(linear.weight.data_ptr(), linear._op_args[1].data_ptr(), code.data_ptr(),
                             None if linear.bias is None else linear.bias.data_ptr(), n, k, state.blocksize,
                             None, 0, 0, 0)

    def _build(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers = (native.Layer * len(self.model.layers))()
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.model.layers, kv_caches)):
            linears = [_base(layer, g) for g in GROUPS]
            L = layers[i]
            L.attn_norm, L.attn_eps = layer.attn_in.weight.data_ptr(), layer.attn_in.eps
            L.mlp_norm, L.mlp_eps = layer.mlp_in.weight.data_ptr(), layer.mlp_in.eps
            if layer.q_norm is not None:
                L.q_norm, L.q_eps = layer.q_norm.weight.data_ptr(), layer.q_norm.eps
                L.k_norm, L.k_eps = layer.k_norm.weight.data_ptr(), layer.k_norm.eps
            L.qkv, L.o, L.up, L.down = (self._linear(x) for x in linears)
            L.heads, L.kv_heads, L.head_dim = layer.heads, layer.kv_heads, layer.head_dim
            L.intermediate = layer.intermediate
            L.rope = -1 if layer.rope is None else self._ropes.index(layer.rope)
            L.scale, L.softcap, L.window = layer.scale, layer.softcap, int(layer.window or 0)
            L.k_cache, L.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        self._layers = layers
        self._caches = tuple(c.data_ptr() for kv in kv_caches for c in kv)
        self._lora_key = None
        self._widths = (max(sum(ly.qkv.sizes) for ly in self.model.layers),
                        max(ly.heads * ly.head_dim for ly in self.model.layers),
                        max(ly.intermediate for ly in self.model.layers))

    def _set_lora(self, step: Any) -> None:
        """Point every linear at this step's adapter tables (None: no adapter rows)."""
        key = None if step is None else step.key
        if key == self._lora_key:
            return
        for i in range(len(self.model.layers)):
            L = self._layers[i]
            for group, field in zip(GROUPS, ("qkv", "o", "up", "down")):
                entry = getattr(L, field)
                table = None if step is None else step.state.native_table(step, (i, group))
                if step is not None and table is None:
                    self._lora_key = None
                    raise RuntimeError(f"layer {i} {group}: adapter weights the native LoRA kernel does not take")
                if table is None or table.entries.numel() == 0:
                    entry.lora_table, entry.lora_parts = None, 0
                else:
                    entry.lora_table, entry.lora_parts = table.entries.data_ptr(), table.entries.shape[0]
                    entry.lora_slots, entry.lora_bf16 = table.slots, int(table.bf16)
                setattr(L, field, entry)
        self._lora_key = key

    # ------------------------------------------------------------------------------------- step

    def __call__(self, inputs: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        meta = inputs.attention
        v0 = kv_caches[0][1]
        cache_dtype = attention_cpu.CACHE_DTYPE_CODES[v0.dtype]
        if self._caches != tuple(c.data_ptr() for kv in kv_caches for c in kv):
            self._build(kv_caches)
        lora_step = inputs.lora
        if lora_step is not None and self._lora_add is None:
            raise RuntimeError("a step with adapter rows, and the native LoRA kernel is not built")
        self._set_lora(lora_step)
        x = self.model.embed_tokens(inputs.input_ids)
        if x.dtype != torch.float32:
            raise RuntimeError(f"the fused step computes in float32; the embedding gave {x.dtype}")
        x = x.contiguous()
        T, hidden = x.shape
        cos, sin, dims = [], [], []
        for rope in self._ropes:
            c, s = rope.cos_sin(inputs.positions, inputs.rope_lengths, torch.float32)
            cos.append(c.contiguous())
            sin.append(s.contiguous())
            dims.append(rope.dim)
        seqs, tables = meta.seqs, meta.tables
        need = self.lib.qsd_work_floats(T, hidden, *self._widths)
        if self._work.numel() < need:
            self._work = torch.empty(need, dtype=torch.float32)
        out = torch.empty(T, hidden, dtype=torch.float32)
        n = max(len(self._ropes), 1)
        cos_p = (ctypes.c_void_p * n)(*[t.data_ptr() for t in cos])
        sin_p = (ctypes.c_void_p * n)(*[t.data_ptr() for t in sin])
        dims_t = (ctypes.c_int64 * n)(*dims)
        slots = meta.slot_mapping.contiguous()
        lora_slot = None if lora_step is None else lora_step.slot
        final = self.model.norm
        step = native.Step(
            x=x.data_ptr(), out=out.data_ptr(), work=self._work.data_ptr(), T=T, hidden=hidden,
            cos=ctypes.cast(cos_p, ctypes.c_void_p), sin=ctypes.cast(sin_p, ctypes.c_void_p),
            rot_dims=ctypes.cast(dims_t, ctypes.c_void_p), slots=slots.data_ptr(), seqs=seqs.data_ptr(),
            S=seqs.shape[0], tables=tables.data_ptr(), block_size=v0.shape[1], cache_dtype=cache_dtype,
            lora_slot=None if lora_slot is None else lora_slot.data_ptr(), final_norm=final.weight.data_ptr(),
            final_eps=final.eps, bf16_products=int(quant_cpu.bf16_products_allowed()),
            threads=torch.get_num_threads(), num_decodes=meta.num_decodes,
            lora=None if lora_step is None else self._lora_add,
            **self._kernels)
        rc = self.lib.qsd_forward(ctypes.addressof(self._layers), len(self.model.layers), ctypes.addressof(step))
        if rc:
            raise RuntimeError(f"the fused native step failed (code {rc})")
        return out
