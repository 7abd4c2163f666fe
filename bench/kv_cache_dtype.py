"""What the KV cache dtype (--kv-cache-dtype) does to the default model's output, through the engine's
own runner (attention reading its paged cache), against the same runner with a float32 cache:

- perplexity of the public-domain text `quantserve verify` reads (bench/perplexity.py's), the text
  prefilled in chunks of --chunk tokens so that every chunk attends to the earlier ones through
  the cache, with the KL divergence from the float32 cache's next-token distributions and how
  often both pick the same top token;
- greedy answers to a few chat questions (--max-tokens each): how many answers are token for
  token those of the float32 cache, and where the others first part.

    python bench/kv_cache_dtype.py [--dtypes float32,bfloat16,float16,fp8_e4m3,fp8_e5m2] [--chunk 64]

bench/perplexity.py measures the weights' formats with transformers' forward (no paged cache), so
the KV cache dtype does not show there; this does. Not timed; it still takes the benchmark lock, so
it never runs beside a benchmark that is.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

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


def make_runner(model, kv_cache_dtype: str, tokens: int, chunk: int, seqs: int = 1):
    from quantserve.server.engine import EngineConfig
    from quantserve.server.engine.block_manager import BlockManager
    from quantserve.server.engine.model_runner import ModelRunner
    from quantserve.server.engine.scheduler import Scheduler

    blocks = seqs * (-(-tokens // 16) + 1)
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=blocks, max_num_batched_tokens=chunk, max_num_seqs=seqs,
                                             enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype))
    bm = BlockManager(runner.num_blocks, 16, False)
    return runner, Scheduler(bm, max_num_seqs=seqs, max_num_batched_tokens=chunk)


def text_log_probs(model, ids: list[int], kv_cache_dtype: str, chunk: int) -> torch.Tensor:
    """[len(ids) - 1, vocab] log-probabilities of each next token, the text prefilled in chunks."""
    from quantserve.server.engine import SamplingParams
    from quantserve.server.engine.sequence import Sequence

    runner, sched = make_runner(model, kv_cache_dtype, len(ids), chunk)
    sched.add(Sequence("text", list(ids), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
    out = []
    with torch.inference_mode():
        while sched.has_work():
            batch = sched.schedule()
            inputs = runner.inputs(batch, runner.flatten(batch))
            inputs.logit_rows = torch.arange(inputs.input_ids.shape[0])  # every row's next-token logits
            logits = runner.model.forward_logits(inputs, runner.kv_caches)
            out.append(logits.float().log_softmax(-1))
            sched.postprocess(batch, [0 if sample else None for sample in batch.sample])
    return torch.cat(out)[: len(ids) - 1]


def greedy(model, prompts: list[list[int]], kv_cache_dtype: str, max_tokens: int, chunk: int) -> list[list[int]]:
    """The engine's greedy answers (its runner and sampler), all prompts decoded together."""
    from quantserve.server.engine import SamplingParams
    from quantserve.server.engine.sequence import Sequence

    runner, sched = make_runner(model, kv_cache_dtype, max(map(len, prompts)) + max_tokens, chunk, len(prompts))
    seqs = [Sequence(f"q{i}", list(p), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        batch = sched.schedule()
        sched.postprocess(batch, runner.run(batch).token_ids)
    return [s.token_ids[len(p):] for s, p in zip(seqs, prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16,fp8_e4m3,fp8_e5m2")
    parser.add_argument("--chunk", type=int, default=64, help="prefill chunk (max_num_batched_tokens)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    import transformers
    from quantserve import quant
    from quantserve.server.loading.default_model import default_model_folder
    from quantserve.server.loading.default_text import TEXT
    from quantserve.server.loading.loader import LoadConfig, load_model

    folder = default_model_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = load_model(LoadConfig(str(folder), dtype=torch.float32, quant=quant.QuantConfig(), progress=False)).model
    ids = tokenizer(TEXT).input_ids
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if dtypes[0] != "float32":
        dtypes.insert(0, "float32")
    print(f"default model, NF4 weights, float32 activations, matmul precision {torch.get_float32_matmul_precision()}; "
          f"{len(ids)} tokens of text in chunks of {args.chunk}; {len(prompts)} chat questions x {args.max_tokens} "
          f"greedy tokens, decoded together")
    print(f"{'kv cache':<10} {'perplexity':>10} {'KL mean':>9} {'KL max':>8} {'top-1 same':>10} "
          f"{'answers same':>12}  first parting (answer: token)  seconds")
    base_logp = base_answers = None
    for dt in dtypes:
        start = time.perf_counter()
        logp = text_log_probs(model, ids, dt, args.chunk)
        answers = greedy(model, prompts, dt, args.max_tokens, args.chunk)
        targets = torch.tensor(ids[1:])
        ppl = math.exp(-logp.gather(1, targets[:, None]).mean().item())
        if base_logp is None:
            base_logp, base_answers = logp, answers
        kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
        same_top = (base_logp.argmax(-1) == logp.argmax(-1)).float().mean().item()
        parts = []
        for i, (a, b) in enumerate(zip(base_answers, answers)):
            if a != b:
                parts.append(f"{i}: {next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)}")
        same = sum(a == b for a, b in zip(base_answers, answers))
        print(f"{dt:<10} {ppl:>10.4f} {kl.mean().item():>9.2e} {kl.max().item():>8.2e} {same_top:>10.4f} "
              f"{same:>5d} of {len(prompts):<4d}  {', '.join(parts) or '-':<28}  {time.perf_counter() - start:.0f}",
              flush=True)
    print("answer 0 (float32 cache):", repr(tokenizer.decode(base_answers[0])))


if __name__ == "__main__":
    main()
