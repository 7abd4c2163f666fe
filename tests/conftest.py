"""Shared test fixtures. bitsandbytes (a test extra) is the oracle for the quant tests."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# With Hugging Face's `kernels` installed, bitsandbytes' CPU backend asks the Hub for a kernel on
# import: the oracle must be bitsandbytes' own code, and a test must not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402 - does not import triton (checked below)

# The Triton tests run the kernels on a CPU through Triton's interpreter. Triton reads
# TRITON_INTERPRET once, when it is first imported (bitsandbytes, transformers and our kernels all
# import it), so it is set here, once for the whole run, before any test module is collected: which
# module imports triton first then does not matter. A TRITON_INTERPRET given in the environment is
# kept (0: the compiled kernels); where torch sees a GPU the compiled kernels are the default.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1 "
                           "(a pytest plugin?): set TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

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
