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
def bnb_peft_model(base_folder: Path, adapter: Path):
    """transformers + bitsandbytes NF4 (its float32 dequantize-and-matmul path) with the adapter
    applied by peft's bitsandbytes LoRA layers: the reference QLoRA users run."""
    from peft import PeftModel

    import quantserve.quant as quant

    from .loader_helpers import bnb_reference

    return PeftModel.from_pretrained(bnb_reference(base_folder, quant.QuantConfig()), adapter).eval()


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


# As tests/server/engine/test_engine_exact.py: a token other than the reference's best is accepted
# only at a near-tie between its two best tokens (batched and unbatched float32 matmuls differ in
# the last bits; at medium precision bf16 products widen that).
NEAR_TIE = {"highest": 1e-3, "high": 1e-3, "medium": 0.25}


def check_greedy(base_folder: Path, adapter: Path | None, prompt: list[int], tokens: list[int],
                 bitsandbytes: bool = False) -> list[str]:
    """Check that `tokens` are the greedy continuation of `prompt` per peft's model (teacher
    forcing: one forward over prompt + tokens, each token the argmax of the logits before it, or
    second at a near-tie). Much cheaper than generating the reference token by token. Returns notes
    on accepted near-ties; fails on anything else. bitsandbytes: against bnb_peft_model instead."""
    return list(_check_greedy(base_folder, adapter, tuple(prompt), tuple(tokens), torch.get_float32_matmul_precision(),
                              bitsandbytes))


@functools.lru_cache(maxsize=None)
def _check_greedy(base_folder: Path, adapter: Path | None, prompt: tuple[int, ...], tokens: tuple[int, ...],
                  precision: str, bitsandbytes: bool) -> tuple[str, ...]:
    model = bnb_peft_model(base_folder, adapter) if bitsandbytes else peft_model(base_folder, adapter)
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(tokens) - 1].float()
    notes = []
    tie = NEAR_TIE[precision]
    for j, (row, token) in enumerate(zip(logits, tokens)):
        top = row.topk(2)
        best, second = int(top.indices[0]), int(top.indices[1])
        if token == best:
            continue
        margin = float(top.values[0] - top.values[1])
        msg = (f"adapter {adapter}: output token {j} is {token}, peft's best {best} (second {second}, "
               f"margin {margin:.2e})")
        assert token == second and margin < tie, msg
        notes.append(msg)
    return tuple(notes)
