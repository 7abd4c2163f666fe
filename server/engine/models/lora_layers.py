"""LoRA on the decoder forward: each fused linear of every layer gets a wrapper that adds the
deltas of the adapters in this step's batch to the rows that asked for them.

Per step the runner passes a `StepAdapters` (`LoRAState.step_batch`) in the step's inputs, which
every fused linear gets with its input: the adapters in the batch, each flattened row's slot among
them, and [(adapter, rows)]. peft computes base(x) +
lora_B(lora_A(x)) * scaling; per fused linear and adapter: one shrink s = x @ A^T with the A's of
the targeted parts (q, k, v / gate, up) stacked ([n, sum r]), then per part an expand of its
columns of s by scaling * B^T, added into the fused output's columns of that part. Base rows are
untouched, so a base request computes exactly what it computes without adapters.

On CPU, one native call per fused linear does every row of every adapter (kernels/cpu/lora.cpp;
its header says why the torch ops were too slow: in the engine even a prefill chunk's grouped
torch ops took ~5 ms a linear). On CUDA the Triton shrink/expand kernels
(kernels/triton/lora.py) do the same, one launch each per fused linear; elsewhere (no compiler,
no Triton) the grouped torch ops below run. Adapters are kept in bfloat16 on CPU at bf16 matmul
precision (`weight_dtype`).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Optional

import torch

from quantserve.kernels.cpu import build, linear16
from quantserve.kernels.cpu import lora as lora_cpu

from . import families
from ..lora import LoRAAdapter, Target

GROUPS = ("qkv", "o_proj", "up", "down")
FEW_ROWS = 128  # up to this many rows, one torch thread beats two on these tiny matmuls
_TABLE_SETS = 32  # adapter sets whose native tables are kept (a set recurs while its requests run)


class StepAdapters:
    """One step's adapters: `adapters` in slot order, `slot` [rows] int32 (each flattened row's
    slot, -1: the base) for the native kernel, and `groups` [(adapter, rows)] for the torch path
    (rows None: every row is that adapter's)."""

    def __init__(self, state: "LoRAState", adapters: tuple[LoRAAdapter, ...], slot: torch.Tensor,
                 groups: list[tuple[LoRAAdapter, Optional[torch.Tensor]]]) -> None:
        self.state = state  # the per-adapter-set tables the kernels read
        self.adapters, self.slot, self.groups = adapters, slot, groups
        self.key = tuple(a.uid for a in adapters)
        self._slot_on: dict[torch.device, torch.Tensor] = {}

    def slot_on(self, device: torch.device) -> torch.Tensor:
        """`slot` on `device` (copied once per step)."""
        if device.type == "cpu":
            return self.slot
        if device not in self._slot_on:
            self._slot_on[device] = self.slot.to(device)
        return self._slot_on[device]


KERNELS = ("triton", "native", "torch")


def choose_kernel(device: torch.device, compute_dtype: torch.dtype) -> str:
    """The delta kernel for adapters on `device`, chosen once: the Triton shrink/expand kernels on
    CUDA, the native kernel on a CPU computing in float32, else the grouped torch ops."""
    if device.type == "cuda" and _triton_lora() is not None:
        return "triton"
    if device.type == "cpu" and compute_dtype == torch.float32 and lora_cpu.load() is not None:
        return "native"
    return "torch"


class LoRAState:
    """The adapter-capable modules and the tables built per adapter set; `kernel` (KERNELS) is the
    one delta kernel every wrapper runs (a test may set "triton" to run those on CPU tensors under
    TRITON_INTERPRET=1)."""

    def __init__(self, targets: dict[tuple[int, str], Target], kernel: str) -> None:
        self.targets = targets
        self.kernel = kernel
        self._sets: collections.OrderedDict[tuple[int, ...], dict] = collections.OrderedDict()

    def _per_set(self, step: StepAdapters) -> dict:
        """What is built once per adapter set (kernel tables, stacked weights), by fused linear. An
        entry keeps its adapters alive, so pointers into their weights stay valid after an unload."""
        entry = self._sets.get(step.key)
        if entry is None:
            entry = {"adapters": step.adapters}
            self._sets[step.key] = entry
            while len(self._sets) > _TABLE_SETS:
                self._sets.popitem(last=False)
        else:
            self._sets.move_to_end(step.key)
        return entry

    def native_table(self, step: StepAdapters, key: tuple[int, str]) -> Optional[lora_cpu.Table]:
        """The native kernel's table for fused linear `key` under this step's adapters, or None
        when their weights are not ones it takes."""
        entry = self._per_set(step)
        if key not in entry:
            groups = [adapter.groups.get(key) for adapter in step.adapters]
            try:
                entry[key] = lora_cpu.table([[] if g is None else [(g.a[p.r0 : p.r1], p.b_t, p.start, p.end)
                                                                   for p in g.parts] for g in groups])
            except ValueError:
                entry[key] = None
        return entry[key]

    def stacked(self, step: StepAdapters, key: tuple[int, str], width: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Triton kernels' weights for fused linear `key`: A of every slot [slots, R, K] and
        B [slots, width, R] over the fused output's columns, zero-padded to the largest rank sum R
        and zero outside each part's block, and the per-slot scale (ones: scaling is in B)."""
        entry = self._per_set(step)
        name = ("stacked", key)
        if name not in entry:
            groups = [adapter.groups.get(key) for adapter in step.adapters]
            present = [g for g in groups if g is not None]
            rank = max(g.a.shape[0] for g in present)
            dtype = present[0].a.dtype
            a = torch.zeros(len(groups), rank, present[0].a.shape[1], dtype=dtype, device=device)
            b = torch.zeros(len(groups), width, rank, dtype=dtype, device=device)
            for q, g in enumerate(groups):
                if g is None:
                    continue
                a[q, : g.a.shape[0]] = g.a
                for p in g.parts:
                    b[q, p.start : p.end, p.r0 : p.r1] = p.b_t.t()
            entry[name] = (a, b, torch.ones(len(groups), device=device))
        return entry[name]


class LoRALinear:
    """A fused linear (fused_linear.FusedLinear) plus the current step's adapter deltas."""

    def __init__(self, base: Any, layer: int, group: str, state: LoRAState) -> None:
        self.base, self.layer, self.group, self.state = base, layer, group, state
        self.key = (layer, group)
        self.sizes = base.sizes

    def __call__(self, x: torch.Tensor, step: Optional[StepAdapters] = None) -> torch.Tensor:
        out = self.base(x)
        if step is None:
            return out
        if self.state.kernel == "triton":
            self._add_triton(x, out, step)
            return out
        if self.state.kernel == "native":
            self._add_native(x, out, step)
            return out
        batch = step.groups
        if x.device.type != "cpu" or torch.get_num_threads() == 1 or step.slot.numel() > FEW_ROWS:
            self._add_deltas(x, out, batch)
            return out
        # On CPU these matmuls are tiny ([rows, 576] x [576, 48]): on one thread ~30 us each,
        # with torch's two ~3-4 ms (its thread pool's wake-up and barrier), 100x slower: measured
        # 0.2x the base's tok/s at 16 streams over 4 adapters, with every projection targeted.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._add_deltas(x, out, batch)
        finally:
            torch.set_num_threads(threads)
        return out

    def _add_native(self, x: torch.Tensor, out: torch.Tensor, step: StepAdapters) -> None:
        """Add the deltas with the native kernel: every row of every adapter in one call."""
        table = self.state.native_table(step, self.key)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if table is None or not out.is_contiguous() or x.dtype != torch.float32 \
                or not lora_cpu.add(lora_cpu.load(), x2, out.view(-1, out.shape[-1]), step.slot, table):
            raise RuntimeError(f"layer {self.layer} {self.group}: the native LoRA kernel refused this call")

    def _add_triton(self, x: torch.Tensor, out: torch.Tensor, step: StepAdapters) -> None:
        """Add the deltas with the Triton shrink/expand kernels, one launch of each per fused
        linear for every row whatever its adapter."""
        if not any(a.groups.get(self.key) is not None for a in step.adapters):
            return
        if not out.is_contiguous():
            raise RuntimeError(f"layer {self.layer} {self.group}: the Triton LoRA kernels write a contiguous output")
        kernels = _triton_lora()
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        a, b, scale = self.state.stacked(step, self.key, out2.shape[1], x.device)
        idx = step.slot_on(x.device)
        kernels.lora_expand(kernels.lora_shrink(x2, a, idx), b, idx, scale, out2)

    def _add_deltas(self, x: torch.Tensor, out: torch.Tensor,
                    batch: list[tuple[LoRAAdapter, Optional[torch.Tensor]]]) -> None:
        for adapter, rows in batch:
            weights = adapter.groups.get(self.key)
            if weights is None:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            s = xs @ weights.a.to(xs.dtype).t()  # [n, sum r] (bf16 weights beside float32 x: widened)
            for p in weights.parts:
                delta = s[:, p.r0 : p.r1] @ p.b_t.to(xs.dtype)  # [n, end - start], scaled
                if rows is None:
                    out[:, p.start : p.end] += delta
                else:
                    out[:, p.start : p.end].index_add_(0, rows, delta)


@functools.lru_cache(maxsize=None)
def _triton_lora() -> Any:
    """kernels/triton/lora.py, or None without Triton."""
    try:
        from quantserve.kernels.triton import lora
    except ImportError:
        return None
    return lora


def weight_dtype(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapters are kept in. On CPU with float32 compute at bf16 matmul precision
    ("medium", as the 4-bit kernels and the 16-bit head read it) and a compiler for the native kernel:
    bfloat16, which it widens exactly and sums in float32. Reading the adapters is most of their
    cost (rank 16 on every projection of the default model: 29 MB of float32 per adapter, more
    than its 4-bit base), and this halves it. Otherwise the compute dtype."""
    # A compiler is what the kernel needs; it is built on the first adapter step, not at every
    # engine start (without it the torch path widens bf16 weights itself, only slower).
    if device.type == "cpu" and compute_dtype == torch.float32 and linear16.bf16_products_allowed() \
            and build.find_compiler() is not None:
        return torch.bfloat16
    return compute_dtype


def attach(model: Any, device: torch.device, compute_dtype: torch.dtype) -> LoRAState:
    """Wrap the fused linears of a DecoderModel; return the state the runner drives and the
    map of adapter-capable modules ((layer, peft module name) -> Target) adapters are checked against."""
    family = families.FAMILIES[model.model.config.model_type]
    base = families.decoder(model.model)
    targets: dict[tuple[int, str], Target] = {}
    state = LoRAState(targets, choose_kernel(device, compute_dtype))
    for i, (layer, hf_layer) in enumerate(zip(model.layers, base.layers)):
        attn, mlp = families.attention_of(hf_layer), hf_layer.mlp
        qkv, mlp_linears = families.projections(family, attn, mlp)
        out = families.out_proj(attn)
        named = {
            "qkv": (qkv, families._QKV[family.qkv]),
            "o_proj": ([out], (next(n for n in families._OUT if getattr(attn, n, None) is out),)),
            "up": (mlp_linears[:-1], families._MLP[family.mlp][:-1]),
            "down": (mlp_linears[-1:], families._MLP[family.mlp][-1:]),
        }
        for group, (linears, names) in named.items():
            start = 0
            for linear, name in zip(linears, names):
                targets[(i, name)] = Target(i, group, start, start + linear.out_features, linear.in_features)
                start += linear.out_features
            setattr(layer, group, LoRALinear(getattr(layer, group), i, group, state))
    return state


def step_batch(state: Optional[LoRAState], adapters: list[Optional[LoRAAdapter]], counts: list[int],
               device: torch.device) -> Optional[StepAdapters]:
    """The StepAdapters of a step whose flattened batch holds counts[i] rows of adapters[i], in
    order (None adapters: the base); None when no row has an adapter."""
    if not any(a is not None for a in adapters):
        return None
    if state is None:
        raise ValueError("adapter rows on a model served without LoRA support")
    rows: dict[int, tuple[LoRAAdapter, list[int]]] = {}
    slot: list[int] = []
    offset = 0
    for adapter, n in zip(adapters, counts):
        if adapter is None:
            slot.extend([-1] * n)
        else:
            rows.setdefault(adapter.uid, (adapter, []))[1].extend(range(offset, offset + n))
            slot.extend([list(rows).index(adapter.uid)] * n)
        offset += n
    in_order = tuple(adapter for adapter, _ in rows.values())
    slots = torch.tensor(slot, dtype=torch.int32)  # read by the CPU kernel only
    if len(rows) == 1 and len(next(iter(rows.values()))[1]) == offset:
        return StepAdapters(state, in_order, slots, [(in_order[0], None)])
    return StepAdapters(state, in_order, slots, [(adapter, torch.tensor(idx, dtype=torch.long, device=device))
                                          for adapter, idx in rows.values()])
