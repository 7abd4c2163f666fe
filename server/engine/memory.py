"""What the engine holds in memory, for the memory report (/v1/memory, /metrics): the weights,
each storage counted once and whole, found by walking the model and what the forward path holds."""

from __future__ import annotations

import torch
from torch import nn


def resident_bytes(*objects: object) -> dict[str, int]:
    """Unique storages reachable from `objects` (modules: parameters, buffers and 4-bit states;
    other objects: their attributes, containers and closures), by dtype and in total."""
    storages: dict[int, tuple[int, str]] = {}
    seen: set[int] = set()

    def add(t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        storages.setdefault(storage.data_ptr(), (storage.nbytes(), str(t.dtype).removeprefix("torch.")))

    def visit(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)) \
                or getattr(obj, "holds_no_weights", False):  # e.g. the fused step's scratch
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj)
            visit(getattr(obj, "quant_state", None), depth + 1)
            visit(getattr(obj, "SCB", None), depth + 1)  # an int8 weight's row scales (Int8Params)
        elif isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t, depth + 1)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v, depth + 1)
        elif callable(obj) and getattr(obj, "__closure__", None):
            for cell in obj.__closure__:
                visit(cell.cell_contents, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("quantserve", "dataclasses")):
            visit(vars(obj), depth + 1)
        elif hasattr(obj, "__dataclass_fields__"):
            visit([getattr(obj, f) for f in obj.__dataclass_fields__], depth + 1)

    for obj in objects:
        visit(obj, 0)
    out: dict[str, int] = {"total": 0}
    for nbytes, dtype in storages.values():
        out["total"] += nbytes
        out[dtype] = out.get(dtype, 0) + nbytes
    return out
