"""Embeddings: which pooling a model uses, and one batch of prompts pooled (AsyncEngine.embed).

Pooling per model: the model folder's own sentence-transformers configuration when it has one
(modules.json -> the Pooling module's config: CLS, mean or last token; a Normalize module), else
the mean of the last hidden state, L2-normalized (what decoder LMs are pooled with by default).

A batch runs on the engine thread between two steps, through the engine's own prefill path: the
forward path chosen at start (fused, layers or transformers), its attention backend and the paged
KV cache. Its keys and values go to scratch blocks taken from the block manager and given back
right after (block_manager.take_scratch: blocks holding no cached prefix first, no hash ever
registered), so the prefix cache is left as it was; when too few blocks are free, the batch waits
for running sequences to free theirs rather than preempting them. Batches are cut to the engine's
token budget (prompts flattened, no padding), so decode steps keep running between them; a prompt
longer than the budget is its own batch, prefilled in budget-sized chunks (one forward's
activations at a time), all between the same two steps: its scratch blocks are never held while
the scheduler runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

if TYPE_CHECKING:
    import torch

    from .model_runner import ModelRunner

logger = logging.getLogger(__name__)

PoolingMode = Literal["mean", "last", "cls"]


@dataclasses.dataclass(frozen=True)
class Pooling:
    mode: PoolingMode
    normalize: bool
    source: str  # where the choice came from (shown in errors and logs)
    matryoshka: bool = False  # vectors may be cut to their first `dimensions` (then renormalized)


def pooling_for(model: Any) -> Pooling:
    """The pooling of `model` (a transformers model; its folder is config._name_or_path)."""
    config = getattr(model, "config", None)
    matryoshka = bool(getattr(config, "is_matryoshka", False) or getattr(config, "matryoshka_dimensions", None))
    folder = Path(str(getattr(config, "_name_or_path", "") or ""))
    modules_file = folder / "modules.json"
    if folder.is_dir() and modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text())
            pooling_dir = next(m["path"] for m in modules if m.get("type", "").endswith("Pooling"))
            settings = json.loads((folder / pooling_dir / "config.json").read_text())
        except (OSError, ValueError, StopIteration, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable sentence-transformers config (%s); pooling by mean", folder, exc)
        else:
            normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
            for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"),
                              ("pooling_mode_mean_tokens", "mean")):
                if settings.get(key):
                    return Pooling(mode, normalize, "sentence-transformers config", matryoshka)
            logger.warning("%s: pooling %s not supported; pooling by mean", folder, settings)
    return Pooling("mean", True, "mean of the last hidden state", matryoshka)


def batches(prompts: list[list[int]], budget: int, max_rows: int, block_size: int = 1,
            max_blocks: Optional[int] = None) -> list[list[int]]:
    """Prompt indices, in order, in batches within the engine's step limits: at most `budget`
    tokens, `max_rows` prompts and `max_blocks` KV blocks of `block_size` tokens (the whole cache);
    a prompt longer than the budget is a batch of its own (prefilled in chunks)."""
    out: list[list[int]] = []
    current: list[int] = []
    tokens = blocks = 0
    for i, prompt in enumerate(prompts):
        need = -(-len(prompt) // block_size)
        if current and (tokens + len(prompt) > budget or len(current) == max_rows
                        or (max_blocks is not None and blocks + need > max_blocks)):
            out.append(current)
            current, tokens, blocks = [], 0, 0
        current.append(i)
        tokens += len(prompt)
        blocks += need
    if current:
        out.append(current)
    return out


class EmbedJob:
    """One batch for the engine thread; its result (or error) goes back to the caller's loop."""

    def __init__(self, prompts: list[list[int]], pooling: Pooling, loop: asyncio.AbstractEventLoop) -> None:
        self.prompts, self.pooling, self.loop = prompts, pooling, loop
        self.future: asyncio.Future = loop.create_future()

    def blocks_needed(self, block_size: int) -> int:
        return sum(-(-len(p) // block_size) for p in self.prompts)

    @property
    def abandoned(self) -> bool:
        """The caller gave up (client gone): nothing to compute. Read across threads: a stale
        False only costs the computation."""
        return self.future.done()

    def _settle(self, result: Any, error: Optional[BaseException]) -> None:
        def settle() -> None:
            if self.future.done():  # the caller gave up (client gone)
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass

    def fail(self, error: BaseException) -> None:
        self._settle(None, error)

    def run(self, runner: ModelRunner, blocks: list[int], budget: int,
            release: Callable[[list[int]], None]) -> None:
        """On the engine thread, with the batch's scratch blocks: its pooled vectors, or its error,
        settled once `release` has given the blocks back (the caller sees the cache as it was)."""
        result, error = None, None
        try:
            result = embed_prompts(runner, self.prompts, blocks, self.pooling, budget)
        except Exception as exc:  # noqa: BLE001 - this batch's caller gets it; the engine goes on
            logger.exception("embedding a batch failed")
            error = exc
        finally:
            release(blocks)
        self._settle(result, error)


def embed_prompts(runner: ModelRunner, prompts: list[list[int]], blocks: list[int], pooling: Pooling,
                  budget: int) -> list[list[float]]:
    """Pooled vectors (float32 lists) of `prompts`, their keys and values in `blocks` (each prompt's
    table in turn). Prefilled in passes of at most `budget` tokens (one pass unless a prompt is
    longer); each pass adds to every prompt's running sum, first and last row (float32)."""
    import torch
    import torch.nn.functional as F

    bs = runner.block_size
    tables, used = [], 0
    for prompt in prompts:
        count = -(-len(prompt) // bs)
        tables.append(blocks[used : used + count])
        used += count
    if used > len(blocks):
        raise ValueError(f"{len(prompts)} prompts need {used} KV blocks, given {len(blocks)}")
    done = [0] * len(prompts)  # tokens of each prompt computed so far
    sums: list[Optional[torch.Tensor]] = [None] * len(prompts)
    first: list[Optional[torch.Tensor]] = [None] * len(prompts)
    last: list[Optional[torch.Tensor]] = [None] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        chunks, room = [], budget
        for i, prompt in enumerate(prompts):  # a prompt's earlier chunks always run in an earlier pass
            if done[i] < len(prompt) and room > 0:
                end = min(len(prompt), done[i] + room)
                chunks.append((i, done[i], end))
                room -= end - done[i]
        hidden = runner.prefill_hidden([(prompts[i], start, end, tables[i]) for i, start, end in chunks])
        row = 0
        for i, start, end in chunks:
            rows = hidden[row : row + end - start].float()
            row += end - start
            if start == 0:
                first[i] = rows[0]
            if end == len(prompts[i]):
                last[i] = rows[-1]
            total = rows.sum(0)
            sums[i] = total if sums[i] is None else sums[i] + total
            done[i] = end
    if pooling.mode == "cls":
        pooled = torch.stack(first)  # type: ignore[arg-type]
    elif pooling.mode == "last":
        pooled = torch.stack(last)  # type: ignore[arg-type]
    else:
        lengths = torch.tensor([float(len(p)) for p in prompts], device=sums[0].device)  # type: ignore[union-attr]
        pooled = torch.stack(sums) / lengths[:, None]  # type: ignore[arg-type]
    if pooling.normalize:
        pooled = F.normalize(pooled, dim=-1)
    return pooled.cpu().tolist()
