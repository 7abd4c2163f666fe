"""LoRA adapters for the tests, made by peft on the default model, and the oracle that runs them:
peft's own (unmerged) LoRA forward on transformers over the same NF4 weights the engine serves."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# Targets of the test adapters: attention only, MLP only, every projection.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ATTENTION + MLP


def make_adapter(base_folder: Path, out: Path, targets: list[str], seed: int, r: int = 8, alpha: int = 16,
                 scale: float = 0.15, **config) -> Path:
    """A peft LoRA adapter with non-zero random A and B (init_lora_weights=False), B scaled so
    that the adapter changes the greedy output without wrecking the model; saved in peft's format."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out)
    return out


@functools.lru_cache(maxsize=None)
def peft_model(base_folder: Path, adapter: Path | None):
    """transformers with quant's NF4 layers (as the engine tests' reference), the adapter applied by
    peft's own LoRA layers (never merged). adapter None: the base alone."""
    from peft import PeftModel

    from .engine.conftest import load_quantized

    model = load_quantized(base_folder)
    if adapter is None:
        return model
    return PeftModel.from_pretrained(model, adapter).eval()


@functools.lru_cache(maxsize=None)
def _greedy(base_folder: Path, adapter: Path | None, prompt: tuple[int, ...], max_new: int,
            precision: str) -> tuple[int, ...]:
    from .engine.helpers import hf_greedy

    return tuple(hf_greedy(peft_model(base_folder, adapter), list(prompt), max_new))


def peft_greedy(base_folder: Path, adapter: Path | None, prompt: list[int], max_new: int) -> list[int]:
    return list(_greedy(base_folder, adapter, tuple(prompt), max_new, torch.get_float32_matmul_precision()))
