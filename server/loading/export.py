"""Write a loaded 4-bit or 8-bit model as a transformers + bitsandbytes prequantized checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from quantserve.quant import Linear4bit, Linear8bitLt

from .checkpoint import save_checkpoint
from .loader import LoadResult


def save_quantized(result: LoadResult, out_dir: str | Path, max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write a loaded 4-bit (or LLM.int8) model as a transformers+bitsandbytes prequantized checkpoint:
    safetensors with bitsandbytes' keys (8-bit: int8 `weight`, `SCB`, `weight_format`), config.json
    with its `quantization_config`, generation
    config and tokenizer. `AutoModelForCausalLM.from_pretrained(out_dir)` (with bitsandbytes
    installed) and `server.loader.load_model` both load it without requantizing.

    The folder is written beside `out_dir` and renamed into place; an existing non-empty
    `out_dir` is an error.
    """
    report = result.report
    if report.quant is None:
        raise ValueError("this model was loaded unquantized (quant=None): nothing to save as a quantized checkpoint")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = result.model

    # Tied parameters are stored once (transformers re-ties them from config.json).
    first_name: dict[int, str] = {}
    duplicates: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            duplicates.add(name)
        else:
            first_name[id(param)] = name

    def tensors() -> Iterable[tuple[str, torch.Tensor]]:
        seen: set[int] = set()
        for name, tensor in model.state_dict().items():
            if name in duplicates:
                continue
            tensor = tensor.detach().to("cpu").contiguous().as_subclass(torch.Tensor)
            if tensor.untyped_storage().data_ptr() in seen:
                tensor = tensor.clone()  # e.g. each layer's quant_map is one shared code table
            seen.add(tensor.untyped_storage().data_ptr())
            yield name, tensor

    kept_linears = sorted(report.skipped)
    quant_config = dataclasses.replace(
        report.quant,
        bnb_4bit_compute_dtype=report.quant.bnb_4bit_compute_dtype or report.dtype,
        # Exact names: transformers' skip-pattern rules differ from ours, full names mean the same to both.
        llm_int8_skip_modules=tuple(kept_linears),
    )
    hf_config = copy.deepcopy(model.config)
    hf_config.quantization_config = quant_config.to_dict()
    hf_config.dtype = str(report.dtype).removeprefix("torch.")
    head = model.get_output_embeddings()
    if getattr(hf_config, "tie_word_embeddings", False) and isinstance(head, (Linear4bit, Linear8bitLt)):
        hf_config.tie_word_embeddings = False  # the head was quantized on its own: store it, don't re-tie

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_checkpoint(tensors(), tmp, max_shard_bytes)
        hf_config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if result.tokenizer is not None:
            result.tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
