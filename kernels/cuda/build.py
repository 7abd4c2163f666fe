"""Build the CUDA C++ kernels (gemv_4bit.cu) into a torch extension on first use, and cache it.

`load()` compiles with torch.utils.cpp_extension (ninja + nvcc, or hipcc after torch's hipify on
ROCm) into $QUANTSERVE_CACHE/kernels/cuda/<name> (default ~/.cache/quantserve/kernels/cuda/<name>); the
name hashes the sources, the flags, torch's and the toolkit's versions and the GPU's architecture,
so an edited source or another GPU never loads a stale build. Loading registers the operator
`torch.ops.quant_cuda.gemv_4bit`. Without a GPU, a toolkit or ninja, or when the build fails,
`load()` logs one warning and returns False; the caller then uses the Triton kernels.

`nvcc_check_command()` is the compile-only command CI runs on every .cu file (no GPU needed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional

from ..cache import cache_root

HERE = Path(__file__).parent
SOURCES = (HERE / "gemv_4bit.cu",)
HEADERS = (HERE / "gemv_4bit.cuh",)
NVCC_FLAGS = ("-O3", "-lineinfo")
HIP_FLAGS = ("-O3",)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "error": str | None, "name": str


def cache_dir() -> Path:
    return cache_root() / "kernels" / "cuda"


def unavailable_reason() -> Optional[str]:
    """Why the extension cannot be built here, or None. Cheap: looks for files, compiles nothing."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA or ROCm GPU visible"
    from torch.utils import cpp_extension

    if torch.version.hip is not None:
        if cpp_extension.ROCM_HOME is None:
            return "ROCm toolkit not found (set ROCM_HOME)"
    elif cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def extension_name() -> str:
    import torch

    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.read_bytes())
    arch = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if torch.version.hip is not None and torch.cuda.is_available():
        arch = torch.cuda.get_device_properties(0).gcnArchName
    for part in (NVCC_FLAGS, HIP_FLAGS, torch.__version__, torch.version.cuda, torch.version.hip, arch,
                 os.environ.get("TORCH_CUDA_ARCH_LIST"), sys.version_info[:2]):
        key.update(repr(part).encode())
        key.update(b"\0")
    return f"quant_cuda_{key.hexdigest()[:16]}"


def _build_and_load() -> str:
    import torch
    from torch.utils import cpp_extension

    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    name = extension_name()
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = list(HIP_FLAGS if torch.version.hip is not None else NVCC_FLAGS)
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in SOURCES],
        extra_cuda_cflags=flags,
        extra_include_paths=[str(HERE)],
        build_directory=str(build_dir),
        is_python_module=False,  # the library registers torch.ops.quant_cuda.* itself
        verbose=False,
    )
    if not hasattr(torch.ops.quant_cuda, "gemv_4bit"):
        raise RuntimeError(f"{name} loaded but did not register quant_cuda::gemv_4bit")
    return name


def load() -> bool:
    """Build (first time on this machine) and load the extension; False with one warning if impossible."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    with _lock:
        if "loaded" not in _state:
            try:
                _state["name"] = _build_and_load()
                _state["loaded"], _state["error"] = True, None
            except Exception as exc:  # noqa: BLE001 - any failure means: use the Triton kernels
                _state["loaded"], _state["error"] = False, f"{type(exc).__name__}: {exc}"
                _log.warning("quant CUDA C++ kernels unavailable, using Triton: %s", _state["error"])
    return bool(_state["loaded"])


def describe() -> str:
    """One line on the extension's state, without building it."""
    if "loaded" not in _state:
        reason = unavailable_reason()
        return f"unavailable ({reason})" if reason else "not built yet (builds on the first batch-1 matmul)"
    if _state["loaded"]:
        return f"CUDA C++ batch-1 GEMV ({cache_dir() / str(_state['name'])})"
    return f"unavailable ({_state['error']})"


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME/bin, else PATH, else /usr/local/cuda/bin."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.exists() else None


def nvcc_check_command(nvcc: str, source: Path, arch: str = "sm_80", ptx_only: bool = False) -> list[str]:
    """A compile-only nvcc command for `source` with torch's headers and the extension's flags."""
    from torch.utils import cpp_extension

    cmd = [nvcc, "-std=c++20", *NVCC_FLAGS, *cpp_extension.COMMON_NVCC_FLAGS, f"-I{HERE}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    if ptx_only:
        cmd += [f"-arch=compute_{arch.removeprefix('sm_')}", "--ptx", str(source), "-o", os.devnull]
    else:
        cmd += [f"-arch={arch}", "-Xcompiler", "-fPIC", "-c", str(source), "-o", os.devnull]
    return cmd
