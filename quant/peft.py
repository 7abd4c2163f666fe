"""LoRA on quant's 4-bit layers with peft (QLoRA), through peft's own custom-module API.

peft dispatches a LoraConfig's target modules to LoRA layer classes; `LoraConfig._register_custom_module`
is its public (documented, "experimental") way to add a class for a layer type it does not know.
`register_lora_layers(config)` registers `LoraLinear4bit` for our `Linear4bit` on a config, so

    from peft import LoraConfig
    from quantserve.quant.peft import get_peft_model, load_adapter
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))   # peft's, registered
    ...train...; model.save_pretrained("adapter")          # peft format, loads on transformers+bitsandbytes
    model = load_adapter(base_model, "adapter")             # PeftModel.from_pretrained, registered

Without the registration peft would still wrap Linear4bit (it is an nn.Linear) with its plain
lora.Linear: the forward would be right, but merging would add the float delta to packed bytes.
Vanilla LoRA only (no DoRA or other variants: peft raises naming the unsupported combination).
Needs peft (`pip install quantserve[train]`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as _peft_get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge

from .functional import dequantize_4bit
from .nn import Linear4bit, Params4bit


class LoraLinear4bit(torch.nn.Module, LoraLayer):
    """LoRA around a quant Linear4bit: y = base(x) + lora_B(lora_A(dropout(x))) * scaling.

    The 4-bit weight stays frozen and packed; gradients reach the adapter and the layers below through
    quant's 4-bit matmul backward (one layer's weight dequantized at a time). Mirrors peft's own
    bitsandbytes Linear4bit layer, so the same adapter gives the same outputs on both."""

    def __init__(
        self, base_layer: torch.nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
        lora_alpha: int = 1, **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def _requantize(self, delta: torch.Tensor) -> None:
        # Merging changes the weight: dequantize, add the float delta, quantize again with the
        # same settings (a rounding step, as in peft's bitsandbytes layer, so merged outputs differ
        # slightly from unmerged ones).
        base = self.get_base_layer()
        weight = base.weight
        dense = dequantize_4bit(weight, weight.quant_state, torch.float32) + delta
        if not torch.isfinite(dense).all():
            raise ValueError("non-finite values in the merged weight: the adapter is broken")
        dense = dense.to(weight.quant_state.dtype)
        base.weight = Params4bit(dense, requires_grad=False, **weight._settings()).quantize()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active adapters into the 4-bit weight (dequantize, add, requantize)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            warnings.warn("merging LoRA into a 4-bit weight requantizes it: outputs change by its rounding")
            self._requantize(self.get_delta_weight(adapter).detach().float())
            if self.lora_bias[adapter]:
                self.get_base_layer().bias.data += self.lora_B[adapter].bias.detach() * self.scaling[adapter]
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            self._requantize(-self.get_delta_weight(adapter).detach().float())
            if self.lora_bias[adapter]:
                self.get_base_layer().bias.data -= self.lora_B[adapter].bias.detach() * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            # Outside autocast the adapter runs in its own dtype (float32 after
            # prepare_model_for_kbit_training) and its output is cast back, as peft's bnb layer does.
            requires_conversion = not torch.is_autocast_enabled()
            x_lora = self._cast_input_dtype(x, lora_A.weight.dtype) if requires_conversion else x
            output = lora_B(lora_A(self.lora_dropout[adapter](x_lora))) * self.scaling[adapter]
            if requires_conversion:
                output = output.to(result.dtype)
            result = result + output
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Register LoraLinear4bit for quant's Linear4bit on `config` (in place; returned for chaining)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config


def get_peft_model(model: torch.nn.Module, config: LoraConfig, adapter_name: str = "default", **kwargs: Any):
    """peft.get_peft_model with quant's 4-bit layers registered on `config`."""
    return _peft_get_peft_model(model, register_lora_layers(config), adapter_name=adapter_name, **kwargs)


def load_adapter(
    model: torch.nn.Module, adapter_path: str | os.PathLike, adapter_name: str = "default",
    is_trainable: bool = False, **kwargs: Any,
) -> PeftModel:
    """PeftModel.from_pretrained on a model with quant 4-bit layers: the adapter's LoraConfig is read
    and registered, so its layers wrap Linear4bit with LoraLinear4bit."""
    config = register_lora_layers(LoraConfig.from_pretrained(str(adapter_path)))
    return PeftModel.from_pretrained(
        model, str(adapter_path), adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )
