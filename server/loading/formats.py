"""Weight formats by the name every command takes (--quant nf4|fp4|int8|none) -> QuantConfig: the
one place serve, quantize, inspect, estimate and verify turn a name into a configuration."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from quantserve.quant import QuantConfig

FORMATS = ("nf4", "fp4", "int8", "none")


def quant_config(name: str, *, double_quant: bool = False, blocksize: int = 64,
                 storage: Optional[torch.dtype] = None, skip: Optional[Sequence[str]] = None,
                 int8_activations: bool = False) -> Optional[QuantConfig]:
    """The QuantConfig of format `name` (None for "none": the model's own 16/32-bit weights).
    double_quant, blocksize and storage are the 4-bit formats' (double quantization is refused
    for int8); int8_activations is LLM.int8's opt-in int8 activation kernel."""
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; choose from {', '.join(FORMATS)}")
    if double_quant and name not in ("nf4", "fp4"):
        raise ValueError(f"--double-quant applies to the 4-bit formats (nf4, fp4), not {name}")
    if name == "none":
        return None
    skip = list(skip) if skip is not None else None
    if name == "int8":
        return QuantConfig(load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_activations=int8_activations)
    extra = {} if storage is None else {"bnb_4bit_quant_storage": storage}
    return QuantConfig(bnb_4bit_quant_type=name, bnb_4bit_use_double_quant=double_quant, blocksize=blocksize,
                       llm_int8_skip_modules=skip, **extra)
