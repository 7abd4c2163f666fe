"""Int8Params and Linear8bitLt, drop-in for bitsandbytes.nn.Int8Params / Linear8bitLt (LLM.int8).

As in bitsandbytes, an Int8Params holding a float weight quantizes itself on its first transfer to
a device (`.to(device)`, `.cuda()`, `.cpu()`) via float16, row-wise to int8 with float32 row
absmax (`SCB`); `Linear8bitLt.from_linear(linear, config)` quantizes explicitly. The constructor
defaults are transformers' (has_fp16_weights=False, threshold=6.0), not bitsandbytes' own
(True, 0.0), because that is how load_in_8bit models are built.

State dicts use bitsandbytes' keys: `weight` (int8), `SCB` (float32) and `weight_format` (uint8 0:
row-major), and `load_state_dict` takes such a state dict directly, with no device move first.

The forward is quant.int8_matmul, whatever the module's training flag. By default it is the
dequantized-weight matmul (activations unquantized, exact to float rounding), which is what
bitsandbytes computes on CPU in training mode (MatMul8bitFp); `int8_activations=True` (QuantConfig's
llm_int8_activations) runs LLM.int8's mixed-precision decomposition instead, bitsandbytes' eval-mode
forward byte for byte.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .config import QuantConfig
from .int8 import int8_matmul, int8_vectorwise_quant

WEIGHT_FORMAT_ROW = 0  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"], the only one it still loads


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB) of a float weight, as Int8Params does it: via float16, no outlier hold-back."""
    CB, SCB, _ = int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return CB, SCB


class Int8Params(nn.Parameter):
    """A weight quantized to int8 on its first move to a device (unless has_fp16_weights).

    Quantized, `data` holds the int8 rows (also `CB`, as in bitsandbytes) and `SCB` the float32
    row absmax. Ops on it return plain tensors.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = False,
        has_fp16_weights: bool = False,
        CB: Optional[torch.Tensor] = None,
        SCB: Optional[torch.Tensor] = None,
        **_ignored: Any,
    ) -> "Int8Params":
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.has_fp16_weights = has_fp16_weights
        self.SCB = SCB
        return self

    @property
    def CB(self) -> Optional[torch.Tensor]:
        """The int8 rows (the data itself), or None before quantization."""
        return self.data if self.int8_quantized else None

    @property
    def int8_quantized(self) -> bool:
        return self.dtype == torch.int8 and self.SCB is not None

    def __deepcopy__(self, memo: dict) -> "Int8Params":
        scb = None if self.SCB is None else self.SCB.clone()
        return Int8Params(self.data.clone(), self.requires_grad, self.has_fp16_weights, SCB=scb)

    def __reduce_ex__(self, protocol: int):
        return (Int8Params, (self.data, self.requires_grad, self.has_fp16_weights, None, self.SCB))

    def quantize(self, device: Optional[torch.device | str] = None) -> "Int8Params":
        """A new, quantized Int8Params of this float weight (on `device`, default where it is)."""
        if self.int8_quantized:
            raise RuntimeError("this Int8Params is already quantized")
        weight = self.data.to(device) if device is not None else self.data
        CB, SCB = quantize_weight(weight)
        return Int8Params(CB, False, self.has_fp16_weights, SCB=SCB)

    def to(self, *args: Any, **kwargs: Any) -> "Int8Params":
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if self.int8_quantized:
            # int8 rows keep their dtype (a model.half() must not reinterpret them); only the device changes.
            data = self.data.to(device=device, non_blocking=non_blocking)
            scb = self.SCB.to(device) if device is not None else self.SCB
            return Int8Params(data, self.requires_grad, self.has_fp16_weights, SCB=scb)
        if device is not None and device.type != "meta" and not self.has_fp16_weights:
            return self.quantize(device)
        data = self.data.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return Int8Params(data, self.requires_grad, self.has_fp16_weights)

    def cuda(self, device: Optional[int | torch.device | str] = None, non_blocking: bool = False) -> "Int8Params":
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self) -> "Int8Params":
        return self.to(device="cpu")


class _FP16WeightMatmul(torch.autograd.Function):
    """has_fp16_weights=True with a trainable weight: the forward quantizes the float weight per
    call and runs LLM.int8; the weight's gradient is the float one (straight through), as
    bitsandbytes' CPU training path computes it."""

    @staticmethod
    def forward(ctx, x, weight, bias, threshold, int8_activations):
        CB, SCB = quantize_weight(weight.detach())
        ctx.save_for_backward(x, CB, SCB)
        ctx.has_bias = bias is not None
        return int8_matmul(x.detach(), CB, SCB, None if bias is None else bias.detach(), threshold, int8_activations)

    @staticmethod
    def backward(ctx, grad):
        x, CB, SCB = ctx.saved_tensors
        W = CB.to(x.dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
        grad_x = grad.to(x.dtype) @ W if ctx.needs_input_grad[0] else None
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_w = (grad2.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)) if ctx.needs_input_grad[1] else None
        grad_b = grad2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class Linear8bitLt(nn.Linear):
    """nn.Linear with an int8 weight and LLM.int8's outlier decomposition (computed in x's dtype).

    Args:
        input_features, output_features, bias: as nn.Linear.
        has_fp16_weights: keep the float weight and quantize it at each forward (for training);
            False (default) quantizes it once, on the first move to a device.
        threshold: activations with |x| >= threshold make their column run in 16 bits (0: off);
            with int8_activations only.
        int8_activations: quantize the activations too (LLM.int8 proper, bitsandbytes' eval
            forward byte for byte); False (default): the dequantized-weight matmul.
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = False,
        threshold: float = 6.0,
        index: Any = None,
        device: Optional[torch.device | str] = None,
        int8_activations: bool = False,
    ) -> None:
        super().__init__(input_features, output_features, bias, device)
        self.threshold = float(threshold)
        self.int8_activations = bool(int8_activations)
        self.has_fp16_weights = has_fp16_weights
        self.index = index
        self.weight = Int8Params(self.weight.data, has_fp16_weights, has_fp16_weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Optional[QuantConfig] = None) -> "Linear8bitLt":
        """Quantize an nn.Linear's weight now, on its device (kept in float with
        llm_int8_has_fp16_weight); the bias is shared."""
        config = QuantConfig(load_in_8bit=True) if config is None else config
        with torch.device("meta"):
            module = cls(
                linear.in_features, linear.out_features, bias=False,
                has_fp16_weights=config.llm_int8_has_fp16_weight, threshold=config.llm_int8_threshold,
                int8_activations=config.llm_int8_activations,
            )
        weight = Int8Params(linear.weight.detach(), module.has_fp16_weights, module.has_fp16_weights)
        module.weight = weight if module.has_fp16_weights else weight.quantize()
        module.bias = linear.bias
        return module

    @property
    def SCB(self) -> Optional[torch.Tensor]:
        return getattr(self.weight, "SCB", None)

    def _apply(self, fn: Any, recurse: bool = True) -> "Linear8bitLt":
        # As Linear4bit._apply: nn.Module._apply would write fn(weight) into the old parameter
        # (dropping SCB) and let model.half() cast the int8 rows. The weight is moved by
        # Int8Params.to instead: quantized on its first move, never re-typed after.
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        if not isinstance(weight, Int8Params):
            return self
        float_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        probe = fn(torch.empty(0, device=weight.device, dtype=float_dtype))
        if not isinstance(probe, torch.Tensor) or probe.device.type == "meta":
            return self
        if weight.int8_quantized:
            if probe.device != weight.device:
                self.weight = weight.to(probe.device)
        elif probe.device == weight.device and probe.dtype != float_dtype:
            # A dtype cast (model.half()) of a not-yet-quantized weight: cast, don't quantize.
            self.weight = Int8Params(weight.data.to(probe.dtype), weight.requires_grad, weight.has_fp16_weights)
        else:
            self.weight = weight.to(probe.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not isinstance(weight, Int8Params):
            raise RuntimeError("Linear8bitLt.weight must be an Int8Params")
        if weight.has_fp16_weights:
            if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
                return _FP16WeightMatmul.apply(x, weight, self.bias, self.threshold, self.int8_activations)
            CB, SCB = quantize_weight(weight)
            return int8_matmul(x, CB, SCB, self.bias, self.threshold, self.int8_activations)
        if not weight.int8_quantized:
            # As bitsandbytes: a float weight still here is quantized by the first forward.
            self.weight = weight = weight.quantize()
        return int8_matmul(x, weight.data, weight.SCB, self.bias, self.threshold, self.int8_activations)

    def extra_repr(self) -> str:
        desc = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        quantized = isinstance(self.weight, Int8Params) and self.weight.int8_quantized
        acts = ", int8 activations" if self.int8_activations else ""
        return desc + f", threshold={self.threshold}{acts}, " + ("int8" if quantized else "quantized=False")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight
        if isinstance(weight, Int8Params) and weight.int8_quantized:
            destination[prefix + "SCB"] = weight.SCB if keep_vars else weight.SCB.detach()
            destination[prefix + "weight_format"] = torch.tensor(WEIGHT_FORMAT_ROW, dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
        missing_keys: list, unexpected_keys: list, error_msgs: list,
    ) -> None:
        fmt_key, scb_key, weight_key = prefix + "weight_format", prefix + "SCB", prefix + "weight"
        if fmt_key in state_dict:
            fmt = state_dict[fmt_key]
            fmt = fmt.item() if isinstance(fmt, torch.Tensor) else fmt
            if fmt not in (WEIGHT_FORMAT_ROW, "row"):
                error_msgs.append(f"{fmt_key}: only the row-major weight format (0) is supported, got {fmt!r}")
                return
        if scb_key not in state_dict:
            # A float checkpoint: the ordinary nn.Linear path (quantized on the next .to()).
            if weight_key in state_dict and isinstance(self.weight, Int8Params) and self.weight.int8_quantized:
                error_msgs.append(f"{weight_key}: a float weight cannot be loaded into a quantized Linear8bitLt")
                return
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            if fmt_key in unexpected_keys:
                unexpected_keys.remove(fmt_key)
            return
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
            return
        CB, SCB = state_dict[weight_key], state_dict[scb_key]
        expected = (self.out_features, self.in_features)
        if CB.dtype != torch.int8 or tuple(CB.shape) != expected:
            error_msgs.append(f"{weight_key}: expected int8 {expected}, got {CB.dtype} {tuple(CB.shape)}")
            return
        if not SCB.is_floating_point() or tuple(SCB.shape) != (self.out_features,):
            error_msgs.append(f"{scb_key}: expected float32 ({self.out_features},), got {SCB.dtype} {tuple(SCB.shape)}")
            return
        device = self.weight.device if self.weight.device.type != "meta" else CB.device
        self.weight = Int8Params(
            CB.detach().to(device).contiguous(), False, False, SCB=SCB.detach().to(device, torch.float32).contiguous()
        )
        self.has_fp16_weights = False
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                bias = state_dict[prefix + "bias"].detach()
                dtype = self.bias.dtype if self.bias.device.type != "meta" else bias.dtype
                self.bias = nn.Parameter(bias.to(device, dtype), requires_grad=self.bias.requires_grad)
            else:
                missing_keys.append(prefix + "bias")
