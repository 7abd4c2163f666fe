"""Every .cu file in kernels/cuda compiles with the installed nvcc (compile only: no GPU needed), and
torch's hipify (the ROCm build's first step) accepts the sources. Skips cleanly without nvcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from quantserve.kernels.cuda import build

CUDA_SOURCES = sorted(Path(build.__file__).parent.glob("*.cu"))


def test_every_source_is_built():
    assert CUDA_SOURCES and set(CUDA_SOURCES) == set(build.SOURCES)


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_with_nvcc(source):
    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    # sm_80: the oldest architecture the kernels target (bf16 loads and conversions); the host side
    # is compiled too (-c), against torch's headers, with the flags the extension build uses.
    cmd = build.nvcc_check_command(nvcc, source, "sm_80")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]


def test_sources_hipify(tmp_path):
    """torch.utils.cpp_extension hipifies .cu sources on ROCm; every CUDA runtime name must map."""
    from torch.utils.hipify import hipify_python

    src = tmp_path / "src"
    originals = [*CUDA_SOURCES, *Path(build.__file__).parent.glob("*.cuh")]
    shutil.copytree(Path(build.__file__).parent, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    result = hipify_python.hipify(project_directory=str(src), output_directory=str(src),
                                  includes=[str(src / "*")], show_detailed=False, is_pytorch_extension=True)
    hipified = [Path(r.hipified_path) for r in result.values() if r.hipified_path]
    assert len(set(hipified)) == len(originals)
    for path in hipified:
        text = path.read_text()
        for cuda_only in ("cudaStream_t", "cudaGetLastError", "<<<"):
            assert cuda_only not in text, f"{path.name} still has {cuda_only!r} after hipify"
