"""The decoder stack in one native call per step on CPU (kernels/cpu/decode.cpp), for the models
whose layers it covers; llama.py's Python forward stays the path for everything else.

Why: on the default model a single-stream decode step spent about half its time between kernels
(Python, torch's dispatcher, ctypes, OpenMP workers going back to sleep between ~300 small
regions): one call per step leaves the kernels. The call runs the same matmul, cache-write,
attention and LoRA kernels the Python path calls (through function pointers), so both paths
compute the same products; norms, rope and SiLU are per-row loops in decode.cpp.

Covered: pre-norm layers (RMSNorms that llama.py found equal to the model's own), separate or
fused q/k/v with or without per-head q/k RMSNorms (Qwen3), rotate-half rope (partial rotary,
per-layer-type ropes, NoPE layers), 4-bit linears (any bias), SiLU-gated MLP, paged attention with
windows and soft-capping, LoRA adapter rows; float32 activations, and any KV cache dtype the native
attention kernel reads. `reason()` says why a model is not covered; LlamaModel then keeps its
Python forward.

The plan (one ctypes struct per layer pointing at the fused weights) is built once; a step fills
the Step struct: the embeddings, cos/sin per rope, the attention plan, the LoRA slots.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Optional

import torch
from torch import nn

from quantserve.kernels.cpu import amx as amx_cpu
from quantserve.kernels.cpu import build as quant4_cpu
from quantserve.kernels.cpu import decode as native
from quantserve.kernels.cpu import lora as lora_cpu
from quantserve.kernels.cpu import paged_attention as attention_cpu
from quantserve.quant.backends import cpu as quant_cpu
from quantserve.quant.codebooks import get_4bit_code

from ..attention import AttentionMetadata, native_plan

logger = logging.getLogger(__name__)

GROUPS = ("qkv", "o_proj", "up", "down")  # the fused linears of a layer, as lora_layers names them


def _base(layer: Any, group: str) -> Any:
    """A layer's fused linear, under its LoRA wrapper if it has one."""
    linear = getattr(layer, group)
    return getattr(linear, "base", linear)


def _silu(fn: Any) -> bool:
    return isinstance(fn, nn.SiLU) or type(fn).__name__ == "SiLUActivation"


def reason(model: Any) -> Optional[str]:
    """Why the fused step does not cover this LlamaModel (None: it does)."""
    from .llama import RMSNorm  # llama.py imports this module

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


class NativeStep:
    """`__call__(input_ids, positions, meta, kv_caches) -> final hidden [T, hidden]`, or None when this
    step is not one it runs (the caller runs the Python forward)."""

    # What it holds besides the model's own tensors is step scratch, not weights: the weight count
    # (model_runner.resident_bytes, /v1/memory) does not walk it.
    holds_no_weights = True

    def __init__(self, model: Any) -> None:
        self.model = model
        self.gemm_lib = quant4_cpu.load()
        self.attn_lib = attention_cpu.load()
        self.lib = native.load()
        # Intel AMX tiles for prompt rows, with bf16 products only (kernels/cpu/amx.cpp, decode.cpp's amx_split).
        self.amx_lib = amx_cpu.load() if amx_cpu.available() else None
        self.disabled: Optional[str] = None
        if self.lib is None or self.gemm_lib is None or self.attn_lib is None:
            self.disabled = "a native library is unavailable"
            return
        # The kernels the native step calls, as function pointers (fixed for the process).
        self._kernels = dict(
            gemm=native.function_address(self.gemm_lib, "q4_gemm"),
            write_kv=native.function_address(self.attn_lib, "qs_write_kv"),
            attention=native.function_address(self.attn_lib, "qs_paged_attention"),
            amx=None if self.amx_lib is None else native.function_address(self.amx_lib, "qamx_gemm4"))
        self._layers: Optional[ctypes.Array] = None
        self._caches: Optional[tuple[int, ...]] = None  # the KV caches' addresses the plan points at (no reference)
        self._codes: dict[str, torch.Tensor] = {}  # the 16-entry code table per quant type the plan points at
        self._lora_key: Optional[tuple] = None
        self._work = torch.empty(0, dtype=torch.float32)
        self.steps = self.lora_steps = 0  # steps computed here, and those with adapter rows (tests check)
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

    def _set_lora(self, step: Any) -> bool:
        """Point every linear at this step's adapter tables (None: no adapter rows). False when an
        adapter's weights are not ones the LoRA kernel takes."""
        key = None if step is None else step.key
        if key == self._lora_key:
            return True
        state = getattr(self.model.layers[0].qkv, "state", None)
        for i, layer in enumerate(self.model.layers):
            L = self._layers[i]
            for group, field in zip(GROUPS, ("qkv", "o", "up", "down")):
                entry = getattr(L, field)
                table = None if step is None else state.native_table(step, (i, group))
                if step is not None and table is None:
                    self._lora_key = object()  # unknown: set again next time
                    return False
                if table is None or table.entries.numel() == 0:
                    entry.lora_table, entry.lora_parts = None, 0
                else:
                    entry.lora_table, entry.lora_parts = table.entries.data_ptr(), table.entries.shape[0]
                    entry.lora_slots, entry.lora_bf16 = table.slots, int(table.bf16)
                setattr(L, field, entry)
        self._lora_key = key
        return True

    # ------------------------------------------------------------------------------------- step

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> Optional[torch.Tensor]:
        if self.disabled is not None or meta.triton is not None or not meta.native_decode:
            return None
        k0, v0 = kv_caches[0]
        cache_dtype = attention_cpu.CACHE_DTYPE_CODES.get(v0.dtype)
        if cache_dtype is None or k0.dtype != v0.dtype:
            return None
        if self._caches != tuple(c.data_ptr() for kv in kv_caches for c in kv):
            self._build(kv_caches)
        lora_state = getattr(self.model.layers[0].qkv, "state", None)
        lora_step = None if lora_state is None else lora_state.batch
        if lora_step is not None and lora_cpu.load() is None:
            return None
        if not self._set_lora(lora_step):
            return None
        x = self.model.embed_tokens(input_ids)
        if x.dtype != torch.float32:
            return None
        x = x.contiguous()
        T, hidden = x.shape
        cos, sin, dims = [], [], []
        for rope in self._ropes:
            c, s = rope.cos_sin(positions, meta.rope_lengths, torch.float32)
            cos.append(c.contiguous())
            sin.append(s.contiguous())
            dims.append(rope.dim)
        if meta.native_plan is None:
            meta.native_plan = native_plan(meta, v0.shape[1])
        seqs, tables = meta.native_plan
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
            lora=None if lora_step is None else native.function_address(lora_cpu.load(), "qslora_add"),
            **self._kernels)
        rc = self.lib.qsd_forward(ctypes.addressof(self._layers), len(self.model.layers), ctypes.addressof(step))
        if rc:
            self.disabled = f"the native step declined (code {rc})"
            logger.warning("fused decode step off, computing with the Python forward: %s", self.disabled)
            return None
        self.steps += 1
        self.lora_steps += lora_step is not None
        return out
