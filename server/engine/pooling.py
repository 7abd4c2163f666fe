"""Embeddings: which pooling a model uses, and one batch of prompts pooled (AsyncEngine.embed).

Pooling per model: the model folder's own sentence-transformers configuration when it has one
(modules.json -> the Pooling module's config: CLS, mean or last token; a Normalize module), else
the mean of the last hidden state, L2-normalized (what decoder LMs are pooled with by default).

A batch runs on the engine thread between steps, through the model's own transformers modules
(the weights the engine serves, whatever their quantization) in one padded forward without a
cache: the paged KV cache and its prefix cache are not touched. Batches are cut to the engine's
token budget, so decode steps keep running between them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

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


def batches(prompts: list[list[int]], budget: int) -> list[list[int]]:
    """Prompt indices in batches whose padded size (rows x longest) stays within `budget` tokens
    (a longer prompt is a batch of its own); similar lengths together, so little is padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = len(prompts[i])  # sorted: the newest is the longest
        if current and (len(current) + 1) * longest > budget:
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


class EmbedJob:
    """One batch for the engine thread; its result (or error) goes back to the caller's loop."""

    def __init__(self, prompts: list[list[int]], pooling: Pooling, loop: asyncio.AbstractEventLoop) -> None:
        self.prompts, self.pooling, self.loop = prompts, pooling, loop
        self.future: asyncio.Future = loop.create_future()

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

    def run(self, model: Any) -> None:
        """On the engine thread: the batch's pooled vectors (float32 lists), or its error."""
        try:
            self._settle(embed_batch(model, self.prompts, self.pooling), None)
        except Exception as exc:  # noqa: BLE001 - this batch's caller gets it; the engine goes on
            logger.exception("embedding a batch failed")
            self._settle(None, exc)


def embed_batch(model: Any, prompts: list[list[int]], pooling: Pooling) -> list[list[float]]:
    import torch
    import torch.nn.functional as F

    base = getattr(model, "base_model", model)  # a causal LM's decoder stack (a bare model is its own)
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts])
    longest = int(lengths.max())
    input_ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # right-padded: each real token sits at its own position
        input_ids[row, : len(prompt)] = torch.tensor(prompt)
    mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    with torch.inference_mode():
        hidden = base(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        hidden = hidden.float().cpu()
    if pooling.mode == "cls":
        pooled = hidden[:, 0]
    elif pooling.mode == "last":
        pooled = hidden[torch.arange(len(prompts)), lengths - 1]
    else:
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
    if pooling.normalize:
        pooled = F.normalize(pooled, dim=-1)
    return pooled.tolist()
