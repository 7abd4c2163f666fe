"""Shared test fixtures. bitsandbytes (a test extra) is the oracle for the quant tests."""

from __future__ import annotations

import logging
import os
import warnings

# With Hugging Face's `kernels` installed, bitsandbytes' CPU backend asks the Hub for a kernel on
# import: the oracle must be bitsandbytes' own code, and a test must not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# bitsandbytes' CPU backend tries `from kernels import get_kernel` (Hugging Face's hub package)
# on AVX-512-BF16 machines and logs a warning when the Hub cannot be reached (offline, above); it
# then uses its own native gemv.
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
