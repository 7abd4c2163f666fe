"""What the engine sends back: per request, the choices with news since the last output."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely tokens and their logprobs, best first


@dataclasses.dataclass
class CompletionOutput:
    """One choice's news: text and tokens generated since its previous output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]]
    finish_reason: Optional[str]  # None while running; "stop" | "length" | "abort"

    def merge(self, later: "CompletionOutput") -> None:
        """Append a later delta of the same choice (outputs a slow consumer has not read yet)."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finish_reason = later.finish_reason


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]  # the choices with news in this step
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool  # every choice has finished
    queue_time: Optional[float] = None  # seconds from arrival to the first engine step that ran it

    def merge(self, later: "RequestOutput") -> None:
        by_index = {o.index: o for o in self.outputs}
        for out in later.outputs:
            mine = by_index.get(out.index)
            if mine is None:
                self.outputs.append(out)
                by_index[out.index] = out
            else:
                mine.merge(out)
        self.outputs.sort(key=lambda o: o.index)
        self.num_cached_tokens = later.num_cached_tokens
        self.finished = later.finished
        self.queue_time = self.queue_time if self.queue_time is not None else later.queue_time


@dataclasses.dataclass
class EngineStats:
    num_running: int  # sequences
    num_waiting: int  # sequences (including requests not yet taken from the inbox)
    kv_cache_usage: float  # 0..1, blocks held by sequences
    num_kv_blocks: int
    block_size: int
    prompt_tokens_total: int  # prompt tokens of admitted requests
    generation_tokens_total: int
    num_preemptions: int
    prefix_cache_hit_rate: float  # fraction of admitted prompt tokens found in the prefix cache
    kv_cache_bytes: int = 0  # the whole KV cache
    kv_cache_dtype: str = ""  # what it stores keys/values in (--kv-cache-dtype resolved), e.g. "bfloat16"
    num_requests_finished: int = 0
    num_steps: int = 0
