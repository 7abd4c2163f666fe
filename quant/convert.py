"""Replace the nn.Linear layers of a model with Linear4bit (or Linear8bitLt for load_in_8bit), per a
QuantConfig, and say what happened."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .linear8bit import Linear8bitLt
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
    """The pattern that matches a whole dotted run of `name` ("mlp" matches "layers.0.mlp.up_proj")."""
    parts = name.split(".")
    for pattern in patterns:
        pattern_parts = pattern.split(".")
        width = len(pattern_parts)
        if any(parts[i : i + width] == pattern_parts for i in range(len(parts) - width + 1)):
            return pattern
    return None


def plan_quantization(
    model: nn.Module, config: QuantConfig, candidates: dict[str, nn.Module]
) -> tuple[list[str], dict[str, str]]:
    """(names of `candidates` to quantize, {name kept: why}), the rules transformers applies:
    config.llm_int8_skip_modules when given, else the output head and any Linear whose weight is
    tied to an input embedding (quantizing it would quantize the embedding); plus the
    architecture's `_keep_in_fp32_modules`. Works on a model still on the meta device."""
    kept: dict[str, str] = {}
    if config.llm_int8_skip_modules is None:
        get_output = getattr(model, "get_output_embeddings", None)
        head = get_output() if callable(get_output) else None
        # Tied weights are one Parameter object (transformers' tie_weights), on meta too.
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for name, module in candidates.items():
            if module is head:
                kept[name] = "output head (kept in full precision by default, as transformers does)"
            elif id(module.weight) in embeddings:
                kept[name] = "weight tied to an input embedding"
    else:
        for name in candidates:
            matched = _matches(name, config.llm_int8_skip_modules)
            if matched is not None:
                kept[name] = f"in llm_int8_skip_modules ({matched!r})"
    fp32_modules = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name in candidates:
        matched = _matches(name, fp32_modules)
        if matched is not None and name not in kept:
            kept[name] = f"kept in fp32 by the architecture ({matched!r})"
    return [n for n in candidates if n not in kept], kept


def quantize_model(
    model: nn.Module, config: Optional[QuantConfig] = None, progress: bool = False
) -> ConversionReport:
    """Replace every nn.Linear of `model` (in place) with a Linear4bit quantized per `config`, or a
    Linear8bitLt when config.load_in_8bit.

    What is kept in full precision, and why, follows `plan_quantization`. Returns a ConversionReport.
    """
    config = QuantConfig() if config is None else config
    report = ConversionReport(bytes_before=model_nbytes(model))
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    to_quantize, report.skipped = plan_quantization(model, config, linears)
    for name in tqdm(to_quantize, desc="quantizing", unit="layer", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer_type = Linear8bitLt if config.load_in_8bit else Linear4bit
        setattr(parent, child, layer_type.from_linear(linears[name], config))
        report.quantized.append(name)
    report.bytes_after = model_nbytes(model)
    return report
