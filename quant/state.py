"""QuantState: everything needed to undo a 4-bit quantization, in one frozen object.

Serialized exactly as bitsandbytes serializes it (the keys of prequantized "bnb-4bit"
checkpoints), so that states move between the two libraries unchanged:

    weight.absmax, weight.quant_map,
    weight.nested_absmax, weight.nested_quant_map            (double quantization only)
    weight.quant_state.bitsandbytes__<nf4|fp4>               (uint8 bytes of a JSON object:
        quant_type, blocksize, dtype, shape, and nested_blocksize, nested_dtype, nested_offset)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import torch

from .codebooks import QUANT_TYPES

_PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in quant state")
    return dtype


@dataclasses.dataclass(frozen=True)
class NestedState:
    """Double quantization of the absmax statistics: 8-bit codes in blocks of `blocksize`."""

    absmax: torch.Tensor  # float32 [ceil(num_blocks / blocksize)]
    code: torch.Tensor  # float32 [256], the signed dynamic map
    offset: float  # mean of the original absmax, subtracted before quantizing
    blocksize: int = 256
    dtype: torch.dtype = torch.float32


@dataclasses.dataclass(frozen=True)
class QuantState:
    """The statistics and metadata of one 4-bit quantized tensor.

    `absmax` is float32 per block, or uint8 codes when `nested` holds the double-quantization
    state. `dtype` and `shape` are those of the original tensor (dequantize restores them).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor  # float32 [16], the NF4 or FP4 table
    nested: Optional[NestedState] = None

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy of this state with its tensors on `device`."""
        nested = self.nested
        if nested is not None:
            nested = dataclasses.replace(nested, absmax=nested.absmax.to(device), code=nested.code.to(device))
        return dataclasses.replace(self, absmax=self.absmax.to(device), code=self.code.to(device), nested=nested)

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a dict with bitsandbytes' key names.

        packed=False: tensors and plain values side by side.
        packed=True: tensors only (safetensors-ready); the plain values go into one uint8 tensor
        under `quant_state.bitsandbytes__<quant_type>`, as bitsandbytes stores them.
        """
        tensors: dict[str, torch.Tensor] = {"absmax": self.absmax, "quant_map": self.code}
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested is not None:
            tensors["nested_absmax"] = self.nested.absmax
            # A separate copy: safetensors refuses tensors that share memory.
            tensors["nested_quant_map"] = self.nested.code.clone()
            meta.update(
                nested_blocksize=self.nested.blocksize,
                nested_dtype=_dtype_name(self.nested.dtype),
                nested_offset=self.nested.offset,
            )
        if not packed:
            return {**meta, **tensors}
        blob = json.dumps(meta).encode("utf-8")
        tensors[_PACKED_KEY_PREFIX + self.quant_type] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        """Rebuild a state from `as_dict` output (packed or not), keys with or without prefixes.

        Raises ValueError naming what is missing or malformed.
        """
        items: dict[str, Any] = {}
        packed_keys = [k for k in qs_dict if "quant_state.bitsandbytes__" in k or k.startswith("bitsandbytes__")]
        if len(packed_keys) > 1:
            raise ValueError(f"more than one packed quant_state entry: {packed_keys}")
        for key, value in qs_dict.items():
            if key in packed_keys:
                suffix = key.rsplit("bitsandbytes__", 1)[1]
                if suffix not in QUANT_TYPES:
                    raise ValueError(f"packed quant_state key {key!r} names unknown quant type {suffix!r}")
                try:
                    items.update(json.loads(bytes(value.cpu().tolist()).decode("utf-8")))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ValueError(f"packed quant_state {key!r} is not valid JSON: {exc}") from None
            else:
                items[key.rsplit(".", 1)[-1]] = value
        unknown = set(items) - set(_TENSOR_KEYS) - set(_JSON_KEYS)
        if unknown:
            raise ValueError(f"unexpected quant_state keys: {sorted(unknown)}")
        missing = [k for k in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape") if k not in items]
        if missing:
            raise ValueError(f"quant_state is missing {missing}")
        if items["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {items['quant_type']!r}")
        nested = None
        if "nested_absmax" in items:
            nested_missing = [k for k in ("nested_quant_map", "nested_offset", "nested_blocksize") if k not in items]
            if nested_missing:
                raise ValueError(f"quant_state has nested_absmax but is missing {nested_missing}")
            nested = NestedState(
                absmax=items["nested_absmax"].to(device),
                code=items["nested_quant_map"].to(device),
                offset=float(items["nested_offset"]),
                blocksize=int(items["nested_blocksize"]),
                dtype=_dtype_from_name(items.get("nested_dtype", "float32")),
            )
        return cls(
            absmax=items["absmax"].to(device),
            shape=torch.Size(items["shape"]),
            dtype=_dtype_from_name(items["dtype"]),
            blocksize=int(items["blocksize"]),
            quant_type=items["quant_type"],
            code=items["quant_map"].to(device),
            nested=nested,
        )
