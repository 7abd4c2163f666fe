"""CUDA graphs of the decode step, one per batch size of a ladder, owned by the model runner.

A decode step (one new token per sequence) is ~7 4-bit matmuls and two attention launches per layer:
at batch 1 on a GPU, Python and launch overhead would take longer than the kernels. So at startup,
after warm-up and autotuning, the runner captures the decoder forward of a decode-only batch for each
size of `batch_ladder(max_num_seqs)` (1, 2, 4, 8, 16, 32, 64 ... and max_num_seqs itself), largest
first, all graphs sharing one memory pool. A step of n decodes replays the graph of the smallest
captured size >= n: its inputs are copied into static buffers, the rows past n padded (token 0,
position 0, KV slot -1: the write kernel skips it; an attention item whose one row sees no key:
zeros), and the first n rows of the static logits are taken.

Only the Triton attention backend is captured (its plan lives in the static buffers; the other
backends read host-side metadata). Prefill and mixed steps run eagerly; so do steps with LoRA rows
or length-dependent rope (their per-step state is not in the buffers). A replay copies the host
layout the eager path builds (step_inputs.flatten); /metrics counts graph and eager steps.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable, Optional, Sequence

import torch

from .attention.triton import TritonMetadata, TritonPlan
from .step_inputs import HostStep, StepInputs

logger = logging.getLogger(__name__)


def batch_ladder(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: powers of two below max_num_seqs, then max_num_seqs itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    ladder = []
    size = 1
    while size < max_num_seqs:
        ladder.append(size)
        size *= 2
    ladder.append(max_num_seqs)
    return ladder


def padded_size(n: int, ladder: Sequence[int]) -> Optional[int]:
    """The smallest captured size holding n decodes (None: more than the largest)."""
    i = bisect.bisect_left(ladder, n)
    return ladder[i] if i < len(ladder) else None


def pad_decode_inputs(input_ids: list[int], positions: list[int], slots: list[int], contexts: list[int],
                      tables: list[list[int]], size: int, width: int) -> dict[str, list[int]]:
    """Host lists of a decode batch padded to `size` rows, in the static buffers' layout: the work
    items (row, 1, position, row * width), block tables [size, width] (row-major, 0-filled)."""
    n = len(input_ids)
    if n > size:
        raise ValueError(f"{n} decodes do not fit a graph of {size}")
    pad = size - n
    work: list[int] = []
    for i, ctx in enumerate(contexts):
        work += (i, 1, ctx - 1, i * width)
    for i in range(n, size):
        work += (i, 1, -1, 0)  # no visible key: zeros, never NaN, in the padded rows
    flat: list[int] = []
    for table in tables:
        if len(table) > width:
            raise ValueError(f"a block table of {len(table)} blocks is wider than the graphs' {width}")
        flat += table
        flat += [0] * (width - len(table))
    flat += [0] * (pad * width)
    return dict(input_ids=input_ids + [0] * pad, positions=positions + [0] * pad, slots=slots + [-1] * pad,
                work=work, tables=flat)


class DecodeGraphs:
    """Static decode inputs and one captured graph per ladder size.

    forward(step: StepInputs) -> float32 logits [rows, V]: the model's forward_logits with the KV
    caches bound; `splits_for(size)` the attention split count each
    captured size uses (fixed at capture; each item still spreads its own context over them).
    """

    def __init__(self, forward: Callable[..., torch.Tensor], ladder: list[int], width: int, device: torch.device,
                 splits_for: Callable[[int], int]) -> None:
        self.forward = forward
        self.ladder = ladder
        self.width = width
        self.device = device
        self.splits_for = splits_for
        size = ladder[-1]
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(size, **long)
        self.positions = torch.zeros(size, **long)
        self.slots = torch.full((size,), -1, **long)
        self.work = torch.zeros(size, 4, dtype=torch.int32, device=device)
        self.tables = torch.zeros(size * width, dtype=torch.int32, device=device)
        self.rows = torch.arange(size, **long)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, size: int) -> TritonMetadata:
        plan = TritonPlan(self.work[:size], self.tables[: size * self.width], 1, self.splits_for(size))
        return TritonMetadata(self.slots[:size], plan, size)

    def _fill(self, size: int, host: dict[str, list[int]]) -> None:
        self.input_ids[:size].copy_(torch.tensor(host["input_ids"]), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(host["positions"]), non_blocking=True)
        self.slots[:size].copy_(torch.tensor(host["slots"]), non_blocking=True)
        self.work[:size].copy_(torch.tensor(host["work"], dtype=torch.int32).view(size, 4), non_blocking=True)
        self.tables[: size * self.width].copy_(torch.tensor(host["tables"], dtype=torch.int32), non_blocking=True)

    def _run(self, size: int) -> torch.Tensor:
        return self.forward(StepInputs(self.input_ids[:size], self.positions[:size], self._meta(size),
                                       self.rows[:size]))

    def capture(self) -> None:
        """Capture every ladder size, largest first (the pool the largest allocates serves the rest)."""
        for size in reversed(self.ladder):
            self._fill(size, pad_decode_inputs([], [], [], [], [], size, self.width))
            self._run(size)  # warm-up outside the graph: kernels built and tuned, allocator primed
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a model is captured on its loader's thread while the device worker may be
            # stepping other models on the same GPU; "global" would make their syncs fail meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._run(size)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(self.device)

    def holds(self, host: HostStep) -> bool:
        """Whether a captured graph holds this decode-only step."""
        size = padded_size(len(host.input_ids), self.ladder)
        return size is not None and size in self.graphs

    def replay(self, host: HostStep, eager: bool = False) -> torch.Tensor:
        """float32 logits [n, V] of a step of n decodes (`holds` it, or eager: the padded static
        inputs run without a graph, which a CPU test can check)."""
        size = padded_size(len(host.input_ids), self.ladder)
        if size is None:
            raise ValueError(f"{len(host.input_ids)} decodes are more than the largest graph ({self.ladder[-1]})")
        seqs = host.layout.seqs
        self._fill(size, pad_decode_inputs(host.input_ids, host.positions, list(host.layout.slots),
                                           [s.context for s in seqs], [list(s.table) for s in seqs], size,
                                           self.width))
        if eager:
            return self._run(size)[: len(host.input_ids)]
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[: len(host.input_ids)]
