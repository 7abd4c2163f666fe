"""Shared test fixtures. bitsandbytes (a test extra) is the oracle for the quant tests."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

# bitsandbytes' CPU backend tries `from kernels import get_kernel` (the PyPI "kernels" hub
# package) on AVX-512-BF16 machines and logs a warning when it finds our package instead; it
# then uses its own native gemv, which is what it does offline anyway.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bnb():
    import bitsandbytes

    return bitsandbytes


@pytest.fixture(scope="session")
def default_model_dir():
    """The built-in default model converted to a cached HF folder (the first call pays ~30 s)."""
    from quantserve.server.loading.default_model import default_model_folder

    return default_model_folder()
