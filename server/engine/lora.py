"""LoRA adapters served on top of the (4-bit) base, never merged into it.

An adapter is a peft folder (adapter_config.json + adapter_model.safetensors). Loading checks it
against the base as the decoder forward holds it (models/decoder.py: q/k/v and gate/up are fused
linears, so each adapter module becomes a slice of one fused output) and keeps its A and B
matrices in the compute dtype. `LoRARegistry` maps served names to loaded adapters; a request
holds its adapter object, so unloading a name never disturbs requests already running with it.

The per-step application (rows grouped by adapter: shrink x @ A^T, then expand into the
module's output slice) is in models/lora_layers.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import InvalidRequestError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight -> (3, "q_proj", "A")
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:\w+\.)*?(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")

_ids = itertools.count(1)  # 0 is the base model


class AdapterError(ValueError):
    """An adapter that cannot be served on this base (one line: which adapter and why)."""


class AdapterNotFoundError(AdapterError):
    """The adapter's folder or files do not exist."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one adapter module lands in the decoder forward: layer `layer`'s fused linear `group`
    ("qkv", "o_proj", "up", "down"), output columns [start, end)."""

    layer: int
    group: str
    start: int
    end: int
    in_features: int


@dataclasses.dataclass(frozen=True)
class Part:
    """One targeted module of a fused linear: rows [r0, r1) of its group's stacked A, and
    `b_t` = scaling * B^T ([r1 - r0, end - start]) into the fused output's columns [start, end)."""

    r0: int
    r1: int
    start: int
    end: int
    b_t: torch.Tensor


@dataclasses.dataclass
class GroupWeights:
    """One fused linear's share of an adapter: one shrink with `a` = the A of every targeted part
    stacked ([sum r, in]), then each part's expand into its own columns. (A block-diagonal B for
    the whole group would be one matmul, but two thirds zeros for q/k/v: reading those bytes is
    most of what adapters cost on CPU.)"""

    a: torch.Tensor
    parts: tuple[Part, ...]


@dataclasses.dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int  # the largest rank among its modules
    uid: int  # unique per load: the prefix cache's key (a reloaded name is another adapter)
    groups: dict[tuple[int, str], GroupWeights]  # (layer, group) -> weights
    target_modules: tuple[str, ...]
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def num_bytes(self) -> int:
        tensors = [t for g in self.groups.values() for t in (g.a, *(p.b_t for p in g.parts))]
        return sum(t.numel() * t.element_size() for t in tensors)


# Caps on what one load reads, checked on the file's size before reading it: a peft config is a
# few KB; the weights are bounded by what --max-lora-rank allows on the base (max_weights_bytes).
MAX_CONFIG_BYTES = 1 << 20
_HEADER_SLACK = 16 << 20  # safetensors' JSON header and alignment, beyond the tensors themselves


def _regular_file(path: Path, root: Optional[Path]) -> Optional[Path]:
    """`path` with its symlinks resolved when it is a regular file (inside `root` if given), else None.
    Not a FIFO or a device: those would block or never end when read."""
    try:
        real = path.resolve()
        if root is not None and not real.is_relative_to(root):
            return None
        return real if real.is_file() else None
    except (OSError, ValueError, RuntimeError):  # too long, a NUL byte, a symlink loop
        return None


def _read_config(folder: Path, name: str, root: Optional[Path] = None) -> dict[str, Any]:
    """adapter_config.json as a dict. With `root` (runtime loads), the folder and both files must
    resolve inside it. The not-found errors name the folder (for the operator's --lora-modules);
    the HTTP route answers them with one generic message. The other errors name no path or value."""
    try:
        is_dir = folder.is_dir()
    except (OSError, ValueError):  # a name too long, a NUL byte
        is_dir = False
    if not is_dir:
        raise AdapterNotFoundError(f"LoRA adapter '{name}': no folder {folder}")
    config_file = _regular_file(folder / ADAPTER_CONFIG, root)
    if config_file is None:
        raise AdapterNotFoundError(f"LoRA adapter '{name}': {folder} has no {ADAPTER_CONFIG} (a peft adapter folder "
                                   "holds adapter_config.json and adapter_model.safetensors)")
    if _regular_file(folder / ADAPTER_WEIGHTS, root) is None:
        other = " (adapter_model.bin is not read: save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise AdapterNotFoundError(f"LoRA adapter '{name}': {folder} has no {ADAPTER_WEIGHTS}{other}")
    try:
        with open(config_file, "rb") as f:
            if f.seek(0, 2) > MAX_CONFIG_BYTES:
                raise AdapterError(f"LoRA adapter '{name}': {ADAPTER_CONFIG} is over {MAX_CONFIG_BYTES} bytes")
            f.seek(0)
            config = json.loads(f.read(MAX_CONFIG_BYTES + 1).decode("utf-8"))
    except AdapterError:
        raise
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON (the error would echo bytes)
        raise AdapterError(f"LoRA adapter '{name}': {ADAPTER_CONFIG} is not readable JSON") from None
    if not isinstance(config, dict):
        raise AdapterError(f"LoRA adapter '{name}': {ADAPTER_CONFIG} is not a JSON object")
    return config


def _check_config(config: dict[str, Any], name: str) -> None:
    """Refuse what the on-the-fly application does not compute (each would silently change outputs)."""
    def refuse(why: str) -> None:
        raise AdapterError(f"LoRA adapter '{name}': {why}")

    # The messages name the setting, never its value: a config is the client's file on runtime loads.
    if config.get("peft_type", "LORA") != "LORA":
        refuse("peft_type is not LORA")
    if config.get("use_dora"):
        refuse("DoRA (use_dora) is not supported")
    if config.get("bias", "none") != "none":
        refuse("bias is not supported (only 'none')")
    if config.get("modules_to_save"):
        refuse("modules_to_save is not supported (the base's modules are shared)")
    if config.get("alpha_pattern"):
        refuse("alpha_pattern is not supported")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out is not supported")
    if config.get("lora_bias"):
        refuse("lora_bias is not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            refuse(f"adapter_config.json needs a positive number '{key}'")


def max_weights_bytes(targets: dict[tuple[int, str], Target], max_rank: int) -> int:
    """The largest adapter_model.safetensors an adapter of rank <= max_rank on these modules can be:
    A [r, in] and B [out, r] for every module, at 8 bytes an element (float64), plus its header."""
    elements = sum(max_rank * (t.in_features + t.end - t.start) for t in targets.values())
    return 8 * elements + _HEADER_SLACK


MAX_PATH_CHARS = 4096  # Linux's PATH_MAX


def under_root(path: str, root: Path, name: str) -> Path:
    """A runtime load's lora_path as a folder inside `root` (already resolved): relative paths are
    taken from the root; symlinks are resolved before the check, so a link inside the root that
    points elsewhere is refused like a path outside it (AdapterNotFoundError, for every reason)."""
    try:
        if "\0" in path or len(path) > MAX_PATH_CHARS:
            raise ValueError
        folder = (root / path).resolve()  # an absolute `path` replaces the root
    except (OSError, ValueError, RuntimeError):
        folder = None
    if folder is None or not folder.is_relative_to(root):
        raise AdapterNotFoundError(f"LoRA adapter '{name}': {path[:200]!r} is not inside the LoRA root")
    return folder


def load_adapter(name: str, path: str, targets: dict[tuple[int, str], Target], max_rank: int,
                 dtype: torch.dtype, device: torch.device, root: Optional[Path] = None) -> LoRAAdapter:
    """Read and check a peft adapter against the base's modules (`targets`: (layer, module name)
    -> Target). Raises AdapterNotFoundError (missing folder/files, or outside `root` once symlinks
    are resolved) or AdapterError."""
    from safetensors import safe_open

    folder = Path(path).expanduser() if root is None else under_root(path, root, name)
    config = _read_config(folder, name, root)
    _check_config(config, name)
    weights_file = folder / ADAPTER_WEIGHTS
    cap = max_weights_bytes(targets, max_rank)
    try:
        size = weights_file.stat().st_size
    except OSError:  # removed since it was found
        raise AdapterNotFoundError(f"LoRA adapter '{name}': {folder} has no {ADAPTER_WEIGHTS}") from None
    if size > cap:
        raise AdapterError(f"LoRA adapter '{name}': {ADAPTER_WEIGHTS} is larger than an adapter of rank "
                           f"--max-lora-rank {max_rank} on this model can be ({cap} bytes)")
    alpha, use_rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
    base_names = sorted({module for _, module in targets})
    wanted = config.get("target_modules")
    if isinstance(wanted, (list, tuple)):
        missing = sorted(set(wanted) - set(base_names))
        if missing:
            raise AdapterError(f"LoRA adapter '{name}': {len(missing)} of its target modules are not in the base model "
                               f"(its adapter-capable modules: {base_names})")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights_file, framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY.search(key)
                if m is None:
                    raise AdapterError(f"LoRA adapter '{name}': a tensor ({key[:120]!r}) is not a LoRA A/B matrix of a decoder "
                                       "layer's projection (embedding, head or other modules are not supported)")
                layer, module, which = int(m.group(1)), m.group(2), m.group(3)
                pairs.setdefault((layer, module), {})[which] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the adapter's fault, said in one line
        raise AdapterError(f"LoRA adapter '{name}': {ADAPTER_WEIGHTS} is not a readable safetensors file "
                           f"({type(exc).__name__})") from None
    if not pairs:
        raise AdapterError(f"LoRA adapter '{name}': {ADAPTER_WEIGHTS} holds no LoRA weights")
    per_group: dict[tuple[int, str], list[tuple[Target, torch.Tensor, torch.Tensor, float]]] = {}
    max_seen = 0
    for (layer, module), ab in sorted(pairs.items()):
        target = targets.get((layer, module))
        where = f"layers.{layer}.{module}"
        if target is None:
            raise AdapterError(f"LoRA adapter '{name}': the base model has no module {where} "
                               f"(its adapter-capable modules: {base_names})")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"LoRA adapter '{name}': {where} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        out = target.end - target.start
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != target.in_features or b.shape != (out, r):
            raise AdapterError(
                f"LoRA adapter '{name}': {where} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the base's module "
                f"takes {target.in_features} inputs to {out} outputs (A must be [r, {target.in_features}], "
                f"B [{out}, r]): was it trained on another base model?")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"LoRA adapter '{name}': {where} holds NaN or infinite weights")
        max_seen = max(max_seen, r)
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r  # peft's LoraLayer.update_layer
        per_group.setdefault((layer, target.group), []).append((target, a, b, scaling))
    if max_seen > max_rank:  # after the shape checks: an adapter for another base says so first
        where = next(f"layers.{layer}.{module}" for (layer, module), ab in sorted(pairs.items())
                     if ab["A"].shape[0] == max_seen)
        raise AdapterError(f"LoRA adapter '{name}': rank {max_seen} ({where}) is over --max-lora-rank {max_rank}")
    groups = {}
    for key, parts in per_group.items():
        parts.sort(key=lambda p: p[0].start)
        a_cat = torch.cat([a for _, a, _, _ in parts]).to(device=device, dtype=dtype).contiguous()
        compact, r0 = [], 0
        for target, a, b, scaling in parts:
            r = a.shape[0]
            b_t = (b.float().t() * scaling).to(device=device, dtype=dtype).contiguous()
            compact.append(Part(r0, r0 + r, target.start, target.end, b_t))
            r0 += r
        groups[key] = GroupWeights(a_cat, tuple(compact))
    modules = tuple(sorted({module for _, module in pairs}))
    return LoRAAdapter(name=name, path=str(path), rank=max_seen, uid=next(_ids), groups=groups,
                       target_modules=modules)


class LoRARegistry:
    """Served adapter names -> loaded adapters (thread-safe: the HTTP side loads and unloads, the
    engine's submit path looks names up)."""

    def __init__(self, targets: Optional[dict[tuple[int, str], Target]], max_rank: int, dtype: torch.dtype,
                 device: torch.device, unsupported: Optional[str] = None) -> None:
        self.targets = targets
        self.max_rank = max_rank
        self.dtype, self.device = dtype, device
        self.unsupported = unsupported  # why this model cannot serve adapters (None: it can)
        self._adapters: dict[str, LoRAAdapter] = {}
        self._lock = threading.Lock()
        self._loading = threading.Lock()

    def load(self, name: str, path: str, reserved: tuple[str, ...] = (), root: Optional[str] = None,
             capacity: Optional[int] = None) -> LoRAAdapter:
        """Load and register `name` (AdapterError if it is bad, already taken or unsupported). A runtime
        load gives `root` (the adapter must be inside it) and `capacity` (the most adapters held)."""
        if not isinstance(name, str) or not name.strip():
            raise AdapterError("a LoRA adapter needs a non-empty name")
        if self.unsupported is not None or self.targets is None:
            raise AdapterError(f"LoRA adapter '{name}': {self.unsupported or 'this model cannot serve adapters'}")
        if name in reserved:
            raise AdapterError(f"LoRA adapter '{name}': the name is the base model's")

        def check() -> None:  # under self._lock
            if name in self._adapters:
                raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
            if capacity is not None and len(self._adapters) >= capacity:
                raise AdapterError(f"LoRA adapter '{name}': {len(self._adapters)} adapters are loaded, the most "
                                   "--max-cpu-loras allows; unload one first")

        with self._lock:
            check()
        resolved_root = None if root is None else Path(root).expanduser().resolve()
        # One load at a time: each reads up to an adapter's worth of weights into memory.
        with self._loading:
            adapter = load_adapter(name, path, self.targets, self.max_rank, self.dtype, self.device, resolved_root)
        with self._lock:
            check()  # loaded by someone else meanwhile, or the last free place taken
            self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> LoRAAdapter:
        """Forget `name` (KeyError if unknown). Requests already running with it finish with it."""
        with self._lock:
            return self._adapters.pop(name)

    def get(self, name: str) -> Optional[LoRAAdapter]:
        with self._lock:
            return self._adapters.get(name)

    def list(self) -> list[LoRAAdapter]:
        with self._lock:
            return list(self._adapters.values())


def resolve(registry: LoRARegistry, name: Optional[str]) -> Optional[LoRAAdapter]:
    """The adapter a request names (None: the base). Unknown names: InvalidRequestError with
    code model_not_found (the HTTP layer answers 404)."""
    if name is None:
        return None
    adapter = registry.get(name)
    if adapter is None:
        raise InvalidRequestError(f"The model '{name}' does not exist", "model", "model_not_found")
    return adapter
