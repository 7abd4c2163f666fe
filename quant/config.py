"""QuantConfig: transformers' BitsAndBytesConfig fields and meanings, validated once.

A user's existing BitsAndBytesConfig (or the `quantization_config` dict in a prequantized
model's config.json) carries over unchanged:

    QuantConfig.from_dict(model.config.quantization_config)   # or QuantConfig(**kwargs)
    QuantConfig(...).to_dict()  -> the config.json "quantization_config" transformers writes

Two deliberate differences in defaults, both about what is unset:
- `bnb_4bit_quant_type` defaults to "nf4" when constructing QuantConfig directly (what QLoRA
  users and the Hub's bnb-4bit models use); a config.json dict that omits it means "fp4", as it
  does for transformers, so a loaded config means what it meant there.
- `bnb_4bit_compute_dtype=None` means "the dtype of the weights being quantized", not float32:
  a silent fp32 compute dtype is bitsandbytes' best-known cause of slow inference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import torch

from .codebooks import QUANT_TYPES

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORAGE_DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_TRANSFORMERS_DEFAULT_QUANT_TYPE = "fp4"


def _parse_dtype(name: str, value: Any, allowed: Mapping[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in allowed.values():
            return value
    elif isinstance(value, str):
        key = value.removeprefix("torch.")
        if key in allowed:
            return allowed[key]
    raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model's Linear layers (field names from BitsAndBytesConfig).

    Attributes:
        load_in_4bit: quantize Linear weights to 4 bits (NF4/FP4, Linear4bit). Unset (None) means
            "unless load_in_8bit", so QuantConfig() is 4-bit and QuantConfig(load_in_8bit=True) 8-bit.
        load_in_8bit: LLM.int8 instead: int8 rows with float32 row scales (Linear8bitLt).
        bnb_4bit_quant_type: "nf4" or "fp4".
        bnb_4bit_use_double_quant: double quantization of the absmax statistics (~0.37 bit/param less).
        bnb_4bit_compute_dtype: dtype the matmul runs in; None = the original weight dtype.
        bnb_4bit_quant_storage: dtype the packed bytes are stored as (FSDP wants the model's dtype).
        llm_int8_skip_modules: module names (or name suffixes) kept unquantized. None = transformers'
            default: the output head (lm_head) and any tied-embedding Linear stay in full precision.
        llm_int8_threshold: 8-bit only: activations with |x| >= threshold send their input column
            through a 16-bit matmul (the outlier decomposition); 0 turns it off. transformers' 6.0.
        llm_int8_has_fp16_weight: 8-bit only: keep float weights, quantized at each forward (training).
        llm_int8_activations: 8-bit only, quantserve's own (not serialized): quantize the activations
            too (LLM.int8 proper, bitsandbytes' eval-mode Linear8bitLt byte for byte; faster prefill on
            int8 dot-product CPUs, ~0.5-0.9% relative error per matmul). False (default): the
            activations stay in float, the forward is the dequantized-weight matmul within float rounding.
        blocksize: elements per absmax block, 64 by default (bitsandbytes 0.50 on every backend).
    """

    load_in_4bit: Optional[bool] = None
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Optional[torch.dtype] = None
    bnb_4bit_quant_storage: torch.dtype = torch.uint8
    llm_int8_skip_modules: Optional[tuple[str, ...]] = None
    llm_int8_threshold: float = 6.0
    llm_int8_has_fp16_weight: bool = False
    llm_int8_enable_fp32_cpu_offload: bool = False
    blocksize: int = 64
    llm_int8_activations: bool = False

    def __post_init__(self) -> None:
        if self.load_in_4bit is None:
            object.__setattr__(self, "load_in_4bit", not self.load_in_8bit)
        for flag in (
            "load_in_4bit",
            "load_in_8bit",
            "bnb_4bit_use_double_quant",
            "llm_int8_has_fp16_weight",
            "llm_int8_enable_fp32_cpu_offload",
            "llm_int8_activations",
        ):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.load_in_4bit == self.load_in_8bit:
            raise ValueError(
                "exactly one of load_in_4bit and load_in_8bit must be True, got "
                f"load_in_4bit={self.load_in_4bit}, load_in_8bit={self.load_in_8bit}"
            )
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_compute_dtype is not None:
            object.__setattr__(
                self,
                "bnb_4bit_compute_dtype",
                _parse_dtype("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, _FLOAT_DTYPES),
            )
        object.__setattr__(
            self,
            "bnb_4bit_quant_storage",
            _parse_dtype("bnb_4bit_quant_storage", self.bnb_4bit_quant_storage, _STORAGE_DTYPES),
        )
        skip = self.llm_int8_skip_modules
        if skip is not None:
            if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
                raise TypeError(f"llm_int8_skip_modules must be a list of module names, got {skip!r}")
            object.__setattr__(self, "llm_int8_skip_modules", tuple(skip))
        if isinstance(self.blocksize, bool) or self.blocksize not in tuple(2**i for i in range(5, 13)):
            raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {self.blocksize!r}")
        if not isinstance(self.llm_int8_threshold, (int, float)) or isinstance(self.llm_int8_threshold, bool):
            raise TypeError(f"llm_int8_threshold must be a number, got {self.llm_int8_threshold!r}")
        if not math.isfinite(self.llm_int8_threshold) or self.llm_int8_threshold < 0:
            raise ValueError(f"llm_int8_threshold must be finite and >= 0, got {self.llm_int8_threshold!r}")

    @property
    def quant_name(self) -> str:
        """The weight format in one word: "nf4", "fp4" or "int8" (what --quant takes)."""
        return "int8" if self.load_in_8bit else self.bnb_4bit_quant_type

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` dict transformers writes into config.json."""
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": None if self.llm_int8_skip_modules is None else list(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            # None stays None (null): "the weights' own dtype"; transformers reads null as float32,
            # so checkpoint writers resolve it to the real dtype before saving.
            "bnb_4bit_compute_dtype": None
            if self.bnb_4bit_compute_dtype is None
            else _dtype_name(self.bnb_4bit_compute_dtype),
            "bnb_4bit_quant_storage": _dtype_name(self.bnb_4bit_quant_storage),
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "QuantConfig":
        """Read a config.json `quantization_config` (or BitsAndBytesConfig.to_dict()) dict.

        Unknown keys raise ValueError, so a typo does not silently change the quantization.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"quantization_config must be a dict, got {type(config).__name__}")
        method = config.get("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            raise ValueError(f"quant_method must be 'bitsandbytes', got {method!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {"bnb_4bit_quant_type": _TRANSFORMERS_DEFAULT_QUANT_TYPE}
        for key, value in config.items():
            name = key.lstrip("_")
            if key == "quant_method":
                continue
            if name not in fields:
                raise ValueError(f"unknown quantization_config key {key!r}")
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_bnb_config(cls, bnb_config: Any) -> "QuantConfig":
        """Accept a transformers BitsAndBytesConfig object."""
        return cls.from_dict(bnb_config.to_dict())
