"""Fixtures for the engine tests: the built-in default model (SmolLM2-135M-Instruct, NF4, fp32).

The GGUF is converted once into an HF folder by server.default_model (the loader's cache), so
only the first session on a machine pays the ~30 s.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def smollm_folder(default_model_dir: Path) -> Path:
    """The built-in default model as an HF folder (server.default_model converts and caches it)."""
    return default_model_dir


def load_quantized(folder: Path):
    import torch
    import transformers

    import quantserve.quant as quant

    from quantserve.server.engine.models.sixteen_bit import to_16bit

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    quant.quantize_model(model, quant.QuantConfig())
    to_16bit(model)  # embeddings and head at 16 bits, as the engine serves them (and transformers then runs)
    model.eval()
    return model


@pytest.fixture(scope="session")
def smollm(smollm_folder: Path):
    """(NF4-quantized model, tokenizer). Engines built on it share its weights."""
    import transformers

    return load_quantized(smollm_folder), transformers.AutoTokenizer.from_pretrained(smollm_folder)


def run(coro, timeout: float = 600):
    """Run a coroutine on a fresh event loop, with an overall timeout (a hang fails, not blocks)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
