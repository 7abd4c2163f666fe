"""Set-up shared by the Triton kernel tests. tests/conftest.py sets TRITON_INTERPRET=1 for the whole
run before anything imports triton on machines without a GPU; the tests' fixtures take the kernels
from here."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch


def triton_module(name: str, gpu_ok: bool = False) -> ModuleType:
    """quantserve.kernels.triton.<name> for a test that runs it through the interpreter. gpu_ok: on
    a GPU the test runs the compiled kernels instead. Skips only when this run was told not to
    interpret (TRITON_INTERPRET=0 set, or a GPU run for a CPU-only test); fails if triton was
    imported before the interpreter was switched on."""
    if not (gpu_ok and torch.cuda.is_available()):
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("TRITON_INTERPRET is not 1 in this run (tests/conftest.py sets it where torch sees no GPU)")
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(tl.standard.zeros, InterpretedFunction), \
            "triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)"
    return importlib.import_module(f"quantserve.kernels.triton.{name}")


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
