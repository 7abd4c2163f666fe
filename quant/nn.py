"""Params4bit and Linear4bit, drop-in for bitsandbytes.nn.Params4bit / Linear4bit.

As in bitsandbytes, a Params4bit holding a float weight quantizes itself on its first transfer
to a device (`.to(device)`, `.cuda()`, `.cpu()`), so `Linear4bit(...).to("cuda")` works as users
expect; `Linear4bit.from_linear(linear, config)` quantizes explicitly. Constructor defaults are
bitsandbytes' own (fp4, double quantization) so that code written for it gives the same bytes;
`quant.QuantConfig` defaults to nf4. One deliberate difference: an unset compute dtype means the
weight's original dtype, not float32.

State dicts use bitsandbytes' keys (`weight`, `weight.absmax`, `weight.quant_map`, ...,
`weight.quant_state.bitsandbytes__nf4`), and `load_state_dict` accepts them.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from .config import QuantConfig
from .functional import matmul_4bit, quantize_4bit
from .state import QuantState

_QUANT_STATE_MARK = "quant_state.bitsandbytes__"


class Params4bit(nn.Parameter):
    """A weight that is quantized to 4 bits on its first move to a device.

    Before quantization it holds the float weight; afterwards the packed bytes, with
    `quant_state` describing them. Ops on it return plain tensors.
    """

    # Plain-tensor semantics for every op: no subclass propagation, and nothing for
    # torch.compile to trace through.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = False,
        quant_state: Optional[QuantState] = None,
        blocksize: int = 64,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        bnb_quantized: bool = False,
        **_ignored: Any,
    ) -> "Params4bit":
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.quant_state = quant_state
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized or quant_state is not None
        return self

    def _settings(self) -> dict[str, Any]:
        return dict(
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )

    def __deepcopy__(self, memo: dict) -> "Params4bit":
        return Params4bit(
            self.data.clone(), self.requires_grad, quant_state=self.quant_state, bnb_quantized=self.bnb_quantized,
            **self._settings(),
        )

    def __reduce_ex__(self, protocol: int):
        return (_rebuild_params4bit, (self.data, self.requires_grad, self.quant_state, self.bnb_quantized, self._settings()))

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: Mapping[str, Any],
        requires_grad: bool = False,
        device: torch.device | str = "cpu",
        **_ignored: Any,
    ) -> "Params4bit":
        """Wrap packed bytes and their serialized state (bitsandbytes' keys, any prefix)."""
        state = QuantState.from_dict(quantized_stats, device=device)
        return cls(
            data.to(device),
            requires_grad,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested is not None,
            quant_type=state.quant_type,
            quant_storage=data.dtype,
        )

    def quantize(self, device: Optional[torch.device | str] = None) -> "Params4bit":
        """Quantize the float weight (on `device`, default where it is) into a new Params4bit."""
        if self.bnb_quantized:
            raise RuntimeError("this Params4bit is already quantized")
        weight = self.data.to(device) if device is not None else self.data
        packed, state = quantize_4bit(
            weight,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            compress_statistics=self.compress_statistics,
            quant_storage=self.quant_storage,
        )
        return Params4bit(packed, self.requires_grad, quant_state=state, **self._settings())

    def to(self, *args: Any, **kwargs: Any) -> "Params4bit":
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            return self.quantize(device)
        if self.bnb_quantized:
            # The packed bytes keep their storage dtype; only the device changes.
            data = self.data.to(device=device, non_blocking=non_blocking)
            state = self.quant_state.to(device) if device is not None else self.quant_state
            return Params4bit(data, self.requires_grad, quant_state=state, **self._settings())
        data = self.data.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return Params4bit(data, self.requires_grad, **self._settings())

    def cuda(self, device: Optional[int | torch.device | str] = None, non_blocking: bool = False) -> "Params4bit":
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self) -> "Params4bit":
        return self.to(device="cpu")


def _rebuild_params4bit(data, requires_grad, quant_state, bnb_quantized, settings) -> Params4bit:
    return Params4bit(data, requires_grad, quant_state=quant_state, bnb_quantized=bnb_quantized, **settings)


class Linear4bit(nn.Linear):
    """nn.Linear with a 4-bit weight (NF4/FP4). The input is cast to `compute_dtype` for the
    matmul and the output cast back to the input's dtype."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device | str] = None,
        blocksize: int = 64,
    ) -> None:
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Optional[QuantConfig] = None) -> "Linear4bit":
        """Quantize an nn.Linear's weight now, on the device it is on; the bias is shared."""
        config = QuantConfig() if config is None else config
        weight = linear.weight.detach()
        with torch.device("meta"):
            module = cls(
                linear.in_features,
                linear.out_features,
                bias=False,
                compute_dtype=config.bnb_4bit_compute_dtype,
                compress_statistics=config.bnb_4bit_use_double_quant,
                quant_type=config.bnb_4bit_quant_type,
                quant_storage=config.bnb_4bit_quant_storage,
                blocksize=config.blocksize,
            )
        settings = module.weight._settings()
        module.weight = Params4bit(weight, **settings).quantize()
        module.bias = linear.bias
        return module

    def _apply(self, fn: Any, recurse: bool = True) -> "Linear4bit":
        # nn.Module._apply would assign the result of fn(weight) into the old parameter's .data,
        # dropping the new quant_state, and would let a dtype cast (model.half()) rewrite packed
        # bytes stored as a float quant_storage. So the weight is taken out, the rest converted,
        # and the weight moved by Params4bit.to: quantized on its first move, never re-typed after.
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        if not isinstance(weight, Params4bit):
            return self
        float_dtype = weight.dtype if weight.dtype.is_floating_point and not weight.bnb_quantized else torch.float32
        probe = fn(torch.empty(0, device=weight.device, dtype=float_dtype))
        if not isinstance(probe, torch.Tensor) or probe.device.type == "meta":
            return self
        if weight.bnb_quantized:
            if probe.device != weight.device:
                self.weight = weight.to(probe.device)
        elif probe.device == weight.device and probe.dtype != float_dtype:
            # A dtype cast (model.half()) of a not-yet-quantized weight: cast, don't quantize.
            self.weight = Params4bit(weight.data.to(probe.dtype), **weight._settings())
        else:
            # A move, or a same-device .to(device): the first transfer quantizes, as in bitsandbytes.
            self.weight = weight.to(probe.device)
        return self

    @property
    def quant_state(self) -> Optional[QuantState]:
        return self.weight.quant_state if isinstance(self.weight, Params4bit) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.quant_state
        if state is None:
            raise RuntimeError(
                "Linear4bit weight is not quantized yet: move the module to a device (.to(device)) "
                "or build it with Linear4bit.from_linear"
            )
        compute_dtype = self.compute_dtype or state.dtype
        input_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        return matmul_4bit(x.to(compute_dtype), self.weight, state, bias).to(input_dtype)

    def extra_repr(self) -> str:
        state = self.quant_state
        desc = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if state is None:
            return desc + ", quantized=False"
        nested = ", double_quant" if state.nested is not None else ""
        return desc + f", {state.quant_type}, blocksize={state.blocksize}{nested}"

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self.quant_state
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
        missing_keys: list, unexpected_keys: list, error_msgs: list,
    ) -> None:
        weight_prefix = prefix + "weight."
        stats = {k[len(weight_prefix):]: v for k, v in state_dict.items() if k.startswith(weight_prefix)}
        if not any(_QUANT_STATE_MARK in k for k in stats):
            # A float checkpoint: the ordinary nn.Linear path (quantized on the next .to()).
            if prefix + "weight" in state_dict and isinstance(self.weight, Params4bit) and self.weight.bnb_quantized:
                error_msgs.append(f"{prefix}weight: float weights cannot be loaded into a quantized Linear4bit")
                return
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        device = self.weight.device if self.weight.device.type != "meta" else "cpu"
        try:
            self.weight = Params4bit.from_prequantized(state_dict[prefix + "weight"], stats, device=device)
        except (ValueError, TypeError) as exc:
            error_msgs.append(f"{prefix}weight: {exc}")
            return
        state = self.weight.quant_state
        if tuple(state.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{prefix}weight: quantized shape {tuple(state.shape)} does not match "
                f"({self.out_features}, {self.in_features})"
            )
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias = nn.Parameter(state_dict[prefix + "bias"].to(device), requires_grad=self.bias.requires_grad)
            else:
                missing_keys.append(prefix + "bias")
