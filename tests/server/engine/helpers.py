"""Shared helpers for the engine tests on real models."""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from quantserve.server.engine import EngineConfig, SamplingParams
from quantserve.server.engine.engine import AsyncEngine

STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
    "father had taught him. There were one hundred and twelve of them, worn smooth in the middle by "
    "a century of boots. At the top he trimmed the wick, polished the great lens with a soft cloth, "
    "and watched the first ships come round the headland. Some nights the fog rolled in so thick that "
    "he could not see his own hands, and on those nights he sounded the horn every thirty seconds "
    "until dawn. The village below knew the rhythm by heart; children fell asleep to it, and fishermen "
    "set their clocks by it. When the keeper finally retired, the new automatic light blinked faster, "
    "and for a whole winter nobody in the village slept well. "
)

SYSTEM = ("You are a helpful assistant. Answer briefly and precisely, in plain English, and say so "
          "when you do not know the answer. Never make up facts.")

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "Give me a tip for learning to cook.",
    "What is two plus two?",
]


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """Prompts of many lengths: chat prompts (sharing a system prompt prefix) and story slices."""
    story = tokenizer.encode(STORY * 2, add_special_tokens=False)
    prompts = []
    for i in range(count):
        if i % 2 == 0:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": QUESTIONS[(i // 2) % len(QUESTIONS)] + " " * (i // 16)}]
            prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
        else:
            length = 3 + (i * 37) % 290  # 3 .. 292 tokens
            start = (i * 13) % 40
            prompts.append(story[start : start + length])
    return [list(p) for p in prompts]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def hf_top2_margin(model, tokens: list[int]) -> tuple[float, int, int]:
    """(logit margin between the two best next tokens, best, second) per transformers' forward."""
    with torch.inference_mode():
        logits = model(torch.tensor([tokens])).logits[0, -1]
    top = logits.topk(2)
    return float(top.values[0] - top.values[1]), int(top.indices[0]), int(top.indices[1])


@dataclasses.dataclass
class Result:
    token_ids: list[list[int]]
    text: list[str]
    finish_reason: list[str | None]
    logprobs: list[list]
    outputs: list
    num_cached_tokens: int = 0


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, request_id: str,
                  delay: float = 0.0) -> Result:
    if delay:
        await asyncio.sleep(delay)
    n = params.n
    res = Result([[] for _ in range(n)], [""] * n, [None] * n, [[] for _ in range(n)], [])
    async for out in engine.generate(prompt, params, request_id):
        res.outputs.append(out)
        res.num_cached_tokens = out.num_cached_tokens
        for c in out.outputs:
            res.token_ids[c.index] += c.token_ids
            res.text[c.index] += c.text
            if c.logprobs:
                res.logprobs[c.index] += c.logprobs
            if c.finish_reason is not None:
                res.finish_reason[c.index] = c.finish_reason
    assert res.outputs[-1].finished
    return res


async def started(model, tokenizer, **config) -> AsyncEngine:
    engine = AsyncEngine(model, tokenizer, EngineConfig(**config))
    await engine.start()
    return engine


def assert_blocks_all_free(engine: AsyncEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks still held"
    assert all(c == 0 for c in bm.ref_counts)
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
