"""Stream a checkpoint into a model skeleton, quantizing Linear weights on the way.

The model is built with its parameters on the meta device (no memory), each Linear (and GPT-2's
Conv1D, transposed, as transformers+bitsandbytes does) that will be quantized is swapped for an
empty `quant.Linear4bit` (or `quant.Linear8bitLt` for load_in_8bit), then the checkpoint is read
one tensor at a time: cast to the load dtype, moved to the device, quantized there, placed. A
prequantized bitsandbytes checkpoint's layers (4-bit: weight + quant state; 8-bit: int8 weight,
SCB, weight_format) are gathered key by key and wrapped as stored (no dequantize/requantize).
The input embedding and a float output head are placed at 16 bits whatever the load dtype
(server/engine/models/sixteen_bit.py): the largest tensors a 4-bit model keeps unquantized.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from quantserve.quant import Int8Params, Linear4bit, Linear8bitLt, Params4bit, QuantConfig
from quantserve.quant.linear8bit import WEIGHT_FORMAT_ROW
from quantserve.quant.convert import plan_quantization as quant_plan
from quantserve.server.engine.models.sixteen_bit import sixteen_bit_dtype, to_16bit

from .checkpoint import CheckpointReader
from .peak_memory import release_free_memory
from .quant_stats import LayerQuantStats, layer_stats
from .sources import first_line

logger = logging.getLogger("quantserve.loader")

_QUANT_STATE_KEY = ".weight.quant_state.bitsandbytes__"
_SCB_SUFFIX = ".SCB"  # an 8-bit layer's row scales: `<prefix>.SCB` beside `<prefix>.weight`, `<prefix>.weight_format`
_DEFAULT_QUANT = QuantConfig()
_DEFAULT_INT8 = QuantConfig(load_in_8bit=True)
_QUANTIZED_LINEARS = (Linear4bit, Linear8bitLt)
_TRIM_EVERY_BYTES = 4 * 2**20  # return freed read buffers to the OS after every few MiB read


def _prequantized_base(key: str, prefixes: set[str]) -> Optional[str]:
    """The layer prefix a prequantized checkpoint key belongs to (`x.weight`, `x.weight.absmax`, ...,
    `x.SCB`, `x.weight_format`), or None."""
    for suffix in (".weight", _SCB_SUFFIX, ".weight_format"):
        if key.endswith(suffix) and key[: -len(suffix)] in prefixes:
            return key[: -len(suffix)]
    base = key.rpartition(".weight.")[0] if ".weight." in key else None
    return base if base in prefixes else None


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no init cost) and
    their buffers normally: buffers such as rotary tables are computed in __init__, are small and
    are usually not in checkpoints. (accelerate's init_empty_weights(include_buffers=False).)
    Patches nn.Module.register_parameter for the duration: don't build other models meanwhile."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def linear_like_modules(model: nn.Module) -> dict[str, nn.Module]:
    """nn.Linear and transformers' Conv1D (GPT-2: a Linear with its weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, Conv1D)}


def plan_quantization(model: nn.Module, quant: QuantConfig) -> tuple[list[str], dict[str, str]]:
    """(Linear-like modules to quantize, {module kept: why}): quant.quantize_model's rules, applied
    to nn.Linear and Conv1D."""
    return quant_plan(model, quant, linear_like_modules(model))


class WeightStreamer:
    """One load: the model skeleton on the meta device, the quantization plan, and the
    tensor-by-tensor placement of a checkpoint (`run`). Afterwards: `model`, `quant` (as applied),
    `quantized`, `skipped`, `transposed`, `unexpected`, `prequantized`."""

    def __init__(
        self,
        hf_config: Any,
        folder: Path,
        device: torch.device,
        dtype: torch.dtype,
        quant: Optional[QuantConfig],
        checkpoint_quant: Optional[QuantConfig] = None,
        progress: bool = True,
        quant_stats: bool = True,
    ):
        import transformers

        self.device = device
        self.dtype = dtype
        self.requested_quant = quant
        self.progress = progress
        self.folder = folder
        self.prequantized = checkpoint_quant is not None
        # Per quantized layer: what quantizing cost (quant_stats.py), and the seconds spent on it.
        self.collect_stats = quant_stats
        self.layer_stats: list[LayerQuantStats] = []
        self.stats_seconds = 0.0
        if hasattr(hf_config, "quantization_config"):
            hf_config = copy.copy(hf_config)
            del hf_config.quantization_config  # we place the quantized layers ourselves
        with parameters_on_meta():
            try:
                self.model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=self.dtype)
            except (ValueError, TypeError, ImportError) as exc:
                raise ValueError(f"cannot build the {hf_config.model_type} model of {folder}: {first_line(exc)}") from None
        self.quant = self._effective_quant(checkpoint_quant)
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        by_param: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(param), []).append(name)
        # Tied parameters (lm_head.weight is embed_tokens.weight): one checkpoint tensor, all names.
        self.tied = {n: group for group in by_param.values() if len(group) > 1 for n in group}
        self.expected = set(self.model.state_dict(keep_vars=True)) | set(names)
        self.base_prefix = getattr(self.model, "base_model_prefix", "") or ""
        self._renamings = _weight_renamings(self.model)
        self.placed: set[str] = set()  # names filled from the checkpoint so far
        self.transposed: set[str] = set()
        self.quantized: list[str] = []
        self.skipped: dict[str, str] = {}
        # Placed at 16 bits (the input embedding and a float output head, tied or not).
        embed = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        self.sixteen_bit = {f"{n}.weight" for n, m in self.model.named_modules()
                            if m is not None and (m is embed or m is head)}

    def head_missing(self, keys: list[str]) -> bool:
        """The model has an output head of its own (not tied to the input embedding) and no
        checkpoint key fills it: a checkpoint of the bare decoder (e.g. Qwen3Model's weights)."""
        head = self.model.get_output_embeddings()
        if head is None:
            return False
        name = next(f"{n}.weight" for n, m in self.model.named_modules() if m is head)
        if name in self.tied:
            return False
        return not any(self.model_name(key) == name for key in keys)

    def _effective_quant(self, checkpoint_quant: Optional[QuantConfig]) -> Optional[QuantConfig]:
        requested = self.requested_quant
        if checkpoint_quant is None:
            if requested is None:
                return None
            return dataclasses.replace(requested, bnb_4bit_compute_dtype=requested.bnb_4bit_compute_dtype or self.dtype)
        if requested is None:
            raise ValueError(f"{self.folder} is a prequantized bitsandbytes {checkpoint_quant.quant_name} checkpoint; it cannot be loaded unquantized")

        def settings(q: QuantConfig) -> tuple:
            if q.load_in_8bit:
                return ("int8", q.llm_int8_threshold, q.llm_int8_has_fp16_weight, q.llm_int8_skip_modules)
            return (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.blocksize, q.bnb_4bit_quant_storage, q.llm_int8_skip_modules)

        # The default request (nf4, or int8 for an 8-bit checkpoint) means "as stored".
        as_stored = [settings(_DEFAULT_QUANT), settings(checkpoint_quant)]
        if checkpoint_quant.load_in_8bit:
            as_stored.append(settings(_DEFAULT_INT8))
        if settings(requested) not in as_stored:
            stored = checkpoint_quant.quant_name
            if not checkpoint_quant.load_in_8bit:
                stored += f", double quant {checkpoint_quant.bnb_4bit_use_double_quant}"
            raise ValueError(
                f"{self.folder} is already quantized ({stored}); requantizing with other settings is not supported"
            )
        compute = requested.bnb_4bit_compute_dtype or checkpoint_quant.bnb_4bit_compute_dtype
        return dataclasses.replace(checkpoint_quant, bnb_4bit_compute_dtype=compute,
                                   llm_int8_activations=requested.llm_int8_activations)

    def model_name(self, key: str) -> Optional[str]:
        """The model's name for a checkpoint key (GPT-2 checkpoints omit the `transformer.` prefix;
        transformers renames some stored names, e.g. GPT-NeoX's `embed_out` to `lm_head`)."""
        for key in dict.fromkeys((key, _renamed(self._renamings, key))):
            if key in self.expected:
                return key
            prefix = self.base_prefix
            if prefix and f"{prefix}.{key}" in self.expected:
                return f"{prefix}.{key}"
            if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in self.expected:
                return key[len(prefix) + 1 :]
        return None

    def tie_targets(self, target: str, tensor: torch.Tensor) -> list[str]:
        """The names a checkpoint tensor goes to: its tied group, except names an earlier key of
        the group already filled. A checkpoint that stores a tied pair with different values
        (config.json says tied, the weights disagree) is untied, as transformers does."""
        group = self.tied.get(target, [target])
        if target not in self.placed:
            names = [n for n in group if n not in self.placed]
        else:
            module_name, _, attr = target.rpartition(".")
            current = self.model.get_submodule(module_name)._parameters.get(attr)
            same = (
                current is not None and not isinstance(current, (Params4bit, Int8Params)) and current.shape == tensor.shape
                and torch.equal(current, tensor.to(device=current.device, dtype=current.dtype))
            )
            if same:
                return []
            logger.warning("%s differs from the weight it is tied to in config.json; keeping them separate", target)
            names = [target]
        self.placed.update(names)
        return names

    def swap_in_quantized(self, names: list[str]) -> None:
        """Replace the named Linear-like modules with empty Linear4bit / Linear8bitLt (on meta)."""
        from transformers.pytorch_utils import Conv1D

        q = self.quant
        assert q is not None
        for name in names:
            module = self.model.get_submodule(name)
            if isinstance(module, Conv1D):
                in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
                self.transposed.add(name)
            else:
                in_features, out_features = module.in_features, module.out_features
            with torch.device("meta"):
                if q.load_in_8bit:
                    new = Linear8bitLt(
                        in_features, out_features, bias=module.bias is not None,
                        has_fp16_weights=q.llm_int8_has_fp16_weight, threshold=q.llm_int8_threshold,
                        int8_activations=q.llm_int8_activations,
                    )
                else:
                    new = Linear4bit(
                        in_features, out_features, bias=module.bias is not None,
                        compute_dtype=q.bnb_4bit_compute_dtype, compress_statistics=q.bnb_4bit_use_double_quant,
                        quant_type=q.bnb_4bit_quant_type, quant_storage=q.bnb_4bit_quant_storage, blocksize=q.blocksize,
                    )
            new.requires_grad_(False)
            self.model.set_submodule(name, new)
            self.quantized.append(name)

    def place(self, names: list[str], tensor: torch.Tensor) -> None:
        """Put one checkpoint tensor at `names` (several when tied): quantized where the name is a
        Linear4bit's or Linear8bitLt's weight, else one shared Parameter (or buffer) in the load dtype."""
        shared: Optional[nn.Parameter] = None
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if isinstance(module, _QUANTIZED_LINEARS) and attr == "weight":
                weight = tensor.T if module_name in self.transposed else tensor
                expected = (module.out_features, module.in_features)
                if tuple(weight.shape) != expected:
                    raise ValueError(f"checkpoint tensor {name} has shape {list(weight.shape)}, the model expects {list(expected)}")
                weight = weight.to(device=self.device, dtype=self.dtype).contiguous()
                if isinstance(module, Linear8bitLt):
                    fp16 = module.has_fp16_weights  # kept in float (quantized per forward)
                    param = Int8Params(weight, requires_grad=False, has_fp16_weights=fp16)
                    module.weight = param if fp16 else param.quantize()
                    if fp16:  # not quantized until each forward: nothing to measure
                        continue
                else:
                    module.weight = Params4bit(weight, requires_grad=False, **module.weight._settings()).quantize()
                self._measure(module_name, module.weight, weight)
                continue
            is_param = attr in module._parameters
            current = module._parameters[attr] if is_param else module._buffers.get(attr)
            if current is not None and tuple(current.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {list(tensor.shape)}, the model expects {list(current.shape)}")
            if is_param:
                if shared is None:
                    dtype = self.dtype
                    if any(n in self.sixteen_bit for n in names):
                        dtype = sixteen_bit_dtype(self.dtype)
                    value = tensor.to(device=self.device, dtype=dtype if tensor.is_floating_point() else None)
                    shared = nn.Parameter(value, requires_grad=False)
                module._parameters[attr] = shared
            else:
                dtype = current.dtype if current is not None and tensor.is_floating_point() else None
                module._buffers[attr] = tensor.to(device=self.device, dtype=dtype)

    def place_prequantized(self, module_name: str, weight_key: str, tensors: dict[str, torch.Tensor]) -> None:
        module = self.model.get_submodule(module_name)
        if isinstance(module, Linear8bitLt):
            self.place_prequantized_int8(module, weight_key, tensors)
            self._measure(module_name, module.weight, None)
            return
        data = tensors.pop(weight_key)
        try:
            weight = Params4bit.from_prequantized(data, tensors, device=self.device)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{weight_key}: bad quantization state in the checkpoint: {exc}") from None
        expected = (module.out_features, module.in_features)
        if tuple(weight.quant_state.shape) != expected:
            raise ValueError(f"{weight_key} is quantized with shape {list(weight.quant_state.shape)}, the model expects {list(expected)}")
        module.weight = weight
        self._measure(module_name, weight, None)

    def _measure(self, module_name: str, param: Any, original: Optional[torch.Tensor]) -> None:
        """Record what quantizing `module_name` cost (None: a prequantized layer, no original)."""
        if self.collect_stats:
            start = time.perf_counter()
            self.layer_stats.append(layer_stats(module_name, param, original))
            self.stats_seconds += time.perf_counter() - start

    def place_prequantized_int8(self, module: Linear8bitLt, weight_key: str, tensors: dict[str, torch.Tensor]) -> None:
        base = weight_key.removesuffix(".weight")
        CB, SCB = tensors[weight_key], tensors.get(base + _SCB_SUFFIX)
        fmt = tensors.get(base + ".weight_format")
        if SCB is None:
            raise ValueError(f"{weight_key}: the checkpoint has no {base + _SCB_SUFFIX} for this 8-bit weight")
        if fmt is not None and int(fmt.item()) != WEIGHT_FORMAT_ROW:
            raise ValueError(f"{base}.weight_format is {int(fmt.item())}; only the row-major format (0) is supported")
        expected = (module.out_features, module.in_features)
        if CB.dtype != torch.int8 or tuple(CB.shape) != expected or tuple(SCB.shape) != (expected[0],):
            raise ValueError(
                f"{weight_key}: expected int8 {list(expected)} with SCB [{expected[0]}], got {CB.dtype} "
                f"{list(CB.shape)} with SCB {list(SCB.shape)}"
            )
        module.weight = Int8Params(CB.to(self.device).contiguous(), SCB=SCB.to(self.device, torch.float32).contiguous())

    def run(self, reader: CheckpointReader) -> None:
        keys = reader.names
        groups: dict[str, list[str]] = {}  # prequantized module (model name) -> its checkpoint keys
        group_of: dict[str, tuple[str, str]] = {}  # checkpoint key -> (module, weight key)
        if self.prequantized:
            if self.quant is not None and self.quant.load_in_8bit:
                prefixes = {k.removesuffix(_SCB_SUFFIX) for k in keys if k.endswith(_SCB_SUFFIX)}
            else:
                prefixes = {k.split(_QUANT_STATE_KEY)[0] for k in keys if _QUANT_STATE_KEY in k}
            for key in keys:
                base = _prequantized_base(key, prefixes)
                if base is not None:
                    target = self.model_name(base + ".weight")
                    if target is None:
                        raise ValueError(f"checkpoint has quantized weights for {base}, which the model does not have")
                    groups.setdefault(target.removesuffix(".weight"), []).append(key)
                    group_of[key] = (target.removesuffix(".weight"), base + ".weight")
            self.swap_in_quantized(list(groups))
            linears = linear_like_modules(self.model)
            self.skipped = {n: "stored unquantized in the checkpoint" for n in linears}
        elif self.quant is not None:
            to_quantize, self.skipped = plan_quantization(self.model, self.quant)
            self.swap_in_quantized(to_quantize)
        else:
            self.skipped = {n: "quantization off (quant=None)" for n in linear_like_modules(self.model)}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        unexpected: list[str] = []
        transient_bytes = 0  # read since the last release_free_memory()
        bar = tqdm(keys, desc="loading", unit="tensor", disable=not self.progress, leave=False)
        for key in bar:
            if key in group_of:
                module_name, weight_key = group_of[key]
                tensors = pending.setdefault(module_name, {})
                tensors[key] = reader.read(key)
                if len(tensors) == len(groups[module_name]):
                    self.place_prequantized(module_name, weight_key, pending.pop(module_name))
                continue
            target = self.model_name(key)
            if target is None:
                unexpected.append(key)
                continue
            tensor = reader.read(key)
            transient_bytes += tensor.numel() * tensor.element_size()
            names = self.tie_targets(target, tensor)
            if names:
                self.place(names, tensor)
            del tensor
            if transient_bytes > _TRIM_EVERY_BYTES:
                release_free_memory()
                transient_bytes = 0
        bar.close()
        release_free_memory()
        missing = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ValueError(
                f"{self.folder}: the checkpoint has no tensor for {len(missing)} of the model's weights, e.g. "
                f"{missing[:3]} (does config.json describe this checkpoint?)"
            )
        for module in self.model.modules():
            for attr, buffer in module._buffers.items():
                if buffer is not None and buffer.device != self.device:
                    module._buffers[attr] = buffer.to(self.device)
        if unexpected:
            logger.info("ignored %d checkpoint tensors the model has no place for, e.g. %s", len(unexpected), unexpected[:3])
        self.unexpected = unexpected
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        self.layer_stats.sort(key=lambda st: order.get(st.name, len(order)))  # model order, not the file's
        to_16bit(self.model, self.dtype)  # placed at 16 bits already: installs the float32-logits head
        self.model.eval()


def _weight_renamings(model: nn.Module) -> list:
    """transformers' checkpoint renamings for this model (the WeightRenaming entries of its
    conversion mapping; none with a transformers that has no such mapping)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):
        return []


def _renamed(renamings: list, key: str) -> str:
    if not renamings:
        return key
    from transformers.core_model_loading import apply_renamings

    return apply_renamings(key, renamings)


def count_params(model: nn.Module) -> int:
    """Parameters of the original model (a 4-bit weight counts its unpacked elements), tied once."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += state.shape.numel() if state is not None else param.numel()
    return total
