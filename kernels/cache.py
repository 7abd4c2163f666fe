"""quantserve's cache folder, the one place QUANTSERVE_CACHE is read.

    $QUANTSERVE_CACHE (default ~/.cache/quantserve)
        kernels/        C++ libraries built on first use (kernels/cpu)
        kernels/cuda/   the CUDA/HIP extension (kernels/cuda)
        gguf/           GGUF files converted to Hugging Face folders (server/loading)

It lives in kernels/ because everything else imports kernels and kernels imports nothing of ours.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$QUANTSERVE_CACHE, else ~/.cache/quantserve (read on each call: tests point it elsewhere)."""
    env = os.environ.get("QUANTSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantserve"
