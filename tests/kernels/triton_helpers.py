"""Set-up shared by the Triton kernel tests. Each test module sets TRITON_INTERPRET=1 itself at
import when triton is not yet imported and there is no GPU (the interpreter is read once, when
triton is first imported); its fixture then takes the kernels from here."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch


def triton_module(name: str, gpu_ok: bool = False) -> ModuleType:
    """quantserve.kernels.triton.<name> for a test that runs it through the interpreter; skips,
    saying why, when the interpreter is not on for this process. gpu_ok: on a GPU the test runs
    the compiled kernels instead."""
    if not (gpu_ok and torch.cuda.is_available()):
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs TRITON_INTERPRET=1 from the start of the process (automatic on machines without a GPU)")
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.standard.zeros, InterpretedFunction):
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this module in its own process")
    try:
        return importlib.import_module(f"quantserve.kernels.triton.{name}")
    except ImportError as exc:  # pragma: no cover - triton too old, or a foreign "kernels" package
        pytest.skip(f"kernels.triton not importable: {exc}")


def work_items(entries, block_q: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The paged-attention kernels' inputs for entries [(first row, rows, context, block table)]:
    (work int32 [W, 4], tables int32), each sequence's rows cut into items of <= block_q rows."""
    work, tables = [], []
    for row0, n_q, ctx, table in entries:
        offset = len(tables)
        tables += table
        for j in range(0, n_q, block_q):
            work.append((row0 + j, min(block_q, n_q - j), ctx - n_q + j, offset))
    return (torch.tensor(work, dtype=torch.int32, device=device).view(-1, 4),
            torch.tensor(tables, dtype=torch.int32, device=device))
