"""LoRA on the native forward: each fused linear of every layer gets a wrapper that adds the
deltas of the adapters in this step's batch to the rows that asked for them.

Per step the runner sets `LoRAState.batch` to [(adapter, rows)]: the rows (flattened batch
positions) of each adapter; rows is None when the whole batch uses one adapter. Per fused
linear and adapter, two matmuls however many of its parts (q, k, v / gate, up) are targeted:
shrink s = x[rows] @ A^T with the A's of the targeted parts stacked ([n, sum r]), expand
s @ (scaling * B^T) with the B's block diagonal, added into the fused output's columns of those
parts (peft computes base(x) + lora_B(lora_A(x)) * scaling). Base rows are untouched, so a
base request computes exactly what it computes without adapters. The Triton kernels for the
same shrink/expand (kernels/triton/lora.py, one program per row) are not wired in yet: this
grouped PyTorch path runs on every device.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import families
from ..lora import LoRAAdapter, Target

GROUPS = ("qkv", "o_proj", "up", "down")


class LoRAState:
    """What the wrappers read during a step (set by the model runner; None: no adapter rows)."""

    def __init__(self, targets: dict[tuple[int, str], Target]) -> None:
        self.targets = targets
        self.batch: Optional[list[tuple[LoRAAdapter, Optional[torch.Tensor]]]] = None


class LoRALinear:
    """A fused linear (llama.FusedLinear) plus the current step's adapter deltas."""

    def __init__(self, base: Any, layer: int, group: str, state: LoRAState) -> None:
        self.base, self.layer, self.group, self.state = base, layer, group, state
        self.key = (layer, group)
        self.sizes = base.sizes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = self.state.batch
        if not batch:
            return out
        if x.device.type != "cpu" or torch.get_num_threads() == 1:
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

    def _add_deltas(self, x: torch.Tensor, out: torch.Tensor,
                    batch: list[tuple[LoRAAdapter, Optional[torch.Tensor]]]) -> None:
        for adapter, rows in batch:
            weights = adapter.groups.get(self.key)
            if weights is None:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            delta = (xs @ weights.a.t()) @ weights.b_t  # [n, sum r] -> [n, end - start], scaled
            if rows is None:
                out[:, weights.start : weights.end] += delta
            else:
                out[:, weights.start : weights.end].index_add_(0, rows, delta)


def attach(model: Any) -> LoRAState:
    """Wrap the fused linears of a llama.LlamaModel; return the state the runner drives and the
    map of adapter-capable modules ((layer, peft module name) -> Target) adapters are checked against."""
    family = families.FAMILIES[model.model.config.model_type]
    base = families.decoder(model.model)
    targets: dict[tuple[int, str], Target] = {}
    state = LoRAState(targets)
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


def step_batch(adapters: list[Optional[LoRAAdapter]], counts: list[int],
               device: torch.device) -> Optional[list[tuple[LoRAAdapter, Optional[torch.Tensor]]]]:
    """[(adapter, rows)] for a step whose flattened batch holds counts[i] rows of adapters[i], in
    order (None adapters: the base). rows None: every row is that adapter's."""
    if not any(a is not None for a in adapters):
        return None
    rows: dict[int, tuple[LoRAAdapter, list[int]]] = {}
    offset = 0
    for adapter, n in zip(adapters, counts):
        if adapter is not None:
            rows.setdefault(adapter.uid, (adapter, []))[1].extend(range(offset, offset + n))
        offset += n
    if len(rows) == 1:
        adapter, idx = next(iter(rows.values()))
        if len(idx) == offset:
            return [(adapter, None)]
    return [(adapter, torch.tensor(idx, dtype=torch.long, device=device)) for adapter, idx in rows.values()]
