"""Code tables for 4-bit (NF4, FP4) and 8-bit (signed dynamic) block-wise quantization.

The values are part of the bitsandbytes checkpoint format (they are stored as `quant_map` /
`nested_quant_map` in every prequantized checkpoint), so they are spelled out exactly.
"""

from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA). Index order == value order.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2), listed by bit pattern and divided
# by its largest magnitude (12) in float32. Code 8 is +0.0 (bitsandbytes' CPU value).
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(_FP4_RAW, dtype=torch.float32) / 12.0
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def get_4bit_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table for `quant_type` ("nf4" or "fp4") on `device` (a fresh copy)."""
    return _code_cpu(quant_type).to(device, copy=True)


@functools.cache
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    # Stable sort so that FP4's +0.0 (code 0) sorts before -0.0-equal code 8: this reproduces
    # bitsandbytes' code order [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3].
    order = torch.sort(code, stable=True).indices
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return midpoints, order.to(torch.uint8)


def get_4bit_bounds(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(15 float32 midpoints of the sorted table, uint8 map from sorted position to code)."""
    midpoints, order = _bounds_cpu(quant_type)
    return midpoints.to(device), order.to(device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    # for exponent i, the midpoints of linspace(0.1, 1, 2**i + 1) scaled by 10**(i - 6), both
    # signs; then 0 and 1.0; sorted. The float32 linspace/midpoints and the float64 scaling are
    # part of the exact values, so they are computed the same way here.
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-6 + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    if len(data) != 256:  # pragma: no cover - guards the construction above
        raise RuntimeError(f"dynamic map has {len(data)} entries, expected 256")
    return torch.tensor(data, dtype=torch.float32)


def get_dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted float32 values in [-0.99296875, 1.0])."""
    return _dynamic_map_cpu().to(device, copy=True)
