"""Replace the nn.Linear layers of a model with Linear4bit, per a QuantConfig, and say what happened."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .nn import Linear4bit


@dataclasses.dataclass
class ConversionReport:
    """What `quantize_model` did: which Linears were quantized, which kept and why, and bytes."""

    quantized: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines = [
            f"quantized {len(self.quantized)} Linear layers, kept {len(self.skipped)}; "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x smaller)"
        ]
        lines += [f"  kept {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def model_nbytes(model: nn.Module) -> int:
    """Bytes of everything in the model's state dict (parameters, buffers, quant states), shared
    storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key in seen and key[0] != 0:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _matches(name: str, patterns: Iterable[str]) -> Optional[str]:
    parts = name.split(".")
    for pattern in patterns:
        pattern_parts = pattern.split(".")
        width = len(pattern_parts)
        if any(parts[i : i + width] == pattern_parts for i in range(len(parts) - width + 1)):
            return pattern
    return None


def default_skip_modules(model: nn.Module) -> dict[str, str]:
    """What transformers keeps in full precision by default: the output head, and any Linear
    whose weight is tied to an input embedding (quantizing it would quantize the embedding)."""
    skip: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if isinstance(head, nn.Linear) and id(head) in names:
        skip[names[id(head)]] = "output head (kept in full precision by default, as transformers does)"
    embedding_storages = {
        m.weight.untyped_storage().data_ptr()
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.weight.device.type != "meta"
    }
    for name, module in model.named_modules():
        if (
            type(module) is nn.Linear
            and module.weight.device.type != "meta"
            and module.weight.untyped_storage().data_ptr() in embedding_storages
        ):
            skip.setdefault(name, "weight tied to an input embedding")
    return skip


def quantize_model(
    model: nn.Module, config: Optional[QuantConfig] = None, progress: bool = False
) -> ConversionReport:
    """Replace every nn.Linear of `model` (in place) with a Linear4bit quantized per `config`.

    Skipped: modules named in config.llm_int8_skip_modules (a name, or a dotted part of one), or
    when that is None, the output head and tied-embedding Linears. Layers whose in_features * out
    features is odd-sized are still quantized (the format pads). Returns a ConversionReport.
    """
    config = QuantConfig() if config is None else config
    report = ConversionReport(bytes_before=model_nbytes(model))
    if config.llm_int8_skip_modules is None:
        skip_reasons = default_skip_modules(model)
        patterns: tuple[str, ...] = ()
    else:
        skip_reasons = {}
        patterns = config.llm_int8_skip_modules
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, module in tqdm(linears, desc="quantizing", unit="layer", disable=not progress):
        reason = skip_reasons.get(name)
        matched = _matches(name, patterns)
        if matched is not None:
            reason = f"in llm_int8_skip_modules ({matched!r})"
        if reason is not None:
            report.skipped[name] = reason
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(module, config))
        report.quantized.append(name)
    report.bytes_after = model_nbytes(model)
    return report
