"""Shared pieces of the loader tests: tiny random models and the bitsandbytes oracle."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

import quantserve.quant as quant

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ARCHS = ("llama", "qwen2", "gpt2")


def tiny_model(arch: str, seed: int = 0):
    """A small random model of a transformers architecture family. Every Linear's in_features is
    a multiple of 64, so bitsandbytes' AVX-512 dequantize (row-indexed absmax, wrong otherwise;
    see notes/bnb-4bit-format.md) is exact and usable as the oracle."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        config = tf.LlamaConfig(intermediate_size=256, num_key_value_heads=2, **common)
    elif arch == "qwen2":  # attention biases, tied embeddings
        config = tf.Qwen2Config(intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif arch == "gpt2":  # Conv1D layers (transposed weights), tied embeddings, biases everywhere
        config = tf.GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Biases are zero at init; make them count.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def save_tiny(arch: str, folder: Path, **save_kwargs) -> Path:
    tiny_model(arch).save_pretrained(folder, **save_kwargs)
    return folder


def bnb_config(q: quant.QuantConfig, dtype: torch.dtype = torch.float32):
    """The transformers BitsAndBytesConfig meaning the same as `q` (blocksize is always 64 there)."""
    import transformers as tf

    return tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=q.bnb_4bit_compute_dtype or dtype,
        bnb_4bit_quant_storage=q.bnb_4bit_quant_storage,
        llm_int8_skip_modules=None if q.llm_int8_skip_modules is None else list(q.llm_int8_skip_modules),
    )


def exact_bnb(model):
    """bitsandbytes on a CPU with AVX-512-BF16 runs eval-mode Linear4bit through a fused kernel
    that computes in bf16 (~1e-3 off); switch to its dequantize + float matmul path, which is
    what fp32 inference means, so that the comparison is at float tolerance."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_reference(folder: Path, q: quant.QuantConfig | None = None, dtype: torch.dtype = torch.float32):
    """The oracle: transformers + bitsandbytes quantizing (or loading, if prequantized) `folder`,
    with its input embedding and output head at 16 bits, as quantserve loads them."""
    import transformers as tf

    from quantserve.server.engine.models.sixteen_bit import to_16bit

    kwargs = {} if q is None else {"quantization_config": bnb_config(q, dtype)}
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    to_16bit(model, dtype)
    return exact_bnb(model)


def bnb_quantized_modules(model) -> dict:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def quantserve_cache(tmp_path_factory) -> Path:
    """Where converted GGUF folders go in tests: $QUANTSERVE_CACHE when set (reused across runs),
    else one folder for the whole session."""
    env = os.environ.get("QUANTSERVE_CACHE")
    return Path(env) if env else tmp_path_factory.getbasetemp() / "quantserve-cache"
