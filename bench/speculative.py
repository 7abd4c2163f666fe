"""Speculative decoding (--speculative-config) against the same server without it, in one run:

- n-gram prompt lookup, one stream, copy-heavy prompts (code repeated with an edit, a list
  reformatted, a paragraph quoted): tokens/s ratio (target >= 2x on the default model on CPU);
- n-gram, one stream, ordinary chat questions: ratio (target >= 0.95x: it must not cost);
- n-gram, 16 concurrent chat streams: aggregate tokens/s ratio (target >= 0.95x);
- draft model: a random-weight Llama target larger than the default model (same tokenizer), with
  itself as a 4-bit draft (draft = target, "draft_cost": 0 so that the adaptive rule keeps it on):
  the acceptance rate at temperature 0 (100% at highest precision with a float32 KV cache; see
  docs/speculative.md for the defaults) and the cost per verified token (time per output token
  with drafts / without: the draft's own forwards included).

Servers run one at a time and are measured in alternating turns (--rounds), so that a change in
the machine's load falls on both; greedy (temperature 0) requests, completion tokens from usage.

    python bench/speculative.py [--rounds 2] [--k 8] [--skip-draft]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantserve.server.testing import ServerProcess, parse_metrics  # noqa: E402

CODE = '''def parse_config(path):
    """Read a key = value file into a dict."""
    config = {}
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, value = line.split("=", 1)
            config[key.strip()] = value.strip()
    return config
'''
LIST = ("Monday: gym, Tuesday: groceries, Wednesday: dentist at 3pm, Thursday: call mom, Friday: team dinner, "
        "Saturday: hiking with Sam, Sunday: laundry and meal prep")
PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
             "father had taught him. There were one hundred and twelve of them, worn smooth in the middle by a "
             "century of boots.")
COPY = [
    f"Rewrite this function exactly as it is, but rename parse_config to load_settings:\n\n{CODE}",
    f"Reformat this schedule as a bulleted list, one day per line, keeping every word:\n\n{LIST}",
    f"Repeat this paragraph word for word, then stop:\n\n{PARAGRAPH}",
    f"Add a docstring line 'Returns a dict.' to this function and repeat the rest unchanged:\n\n{CODE}",
]
CHAT = [
    "What is the capital of France? Answer in two sentences.",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Describe a cat in a short paragraph.",
    "What should I pack for a weekend trip to the mountains?",
    "Tell me a short story about a robot who learns to paint.",
]
NGRAM_FLAGS = ()  # filled from --k


def ask(url: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    t = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
        "model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - t


def one_stream(url: str, prompts: list[str], max_tokens: int) -> float:
    tokens = seconds = 0.0
    for p in prompts:
        n, dt = ask(url, p, max_tokens)
        tokens += n
        seconds += dt
    return tokens / seconds


def concurrent_streams(url: str, prompts: list[str], streams: int, max_tokens: int) -> float:
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        counts = list(pool.map(lambda i: ask(url, prompts[i % len(prompts)], max_tokens)[0], range(streams)))
    return sum(counts) / (time.perf_counter() - t)


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics", timeout=30).text)


def served(*flags: str, name: str) -> ServerProcess:
    return ServerProcess("--served-model-name", "default", "--kv-cache-memory", "0.5", *flags, api_key=None, name=name)


def measure_ngram(args) -> dict:
    spec = f'{{"method": "ngram", "num_speculative_tokens": {args.k}}}'
    cases = {"copy, 1 stream": lambda u: one_stream(u, COPY, 200),
             "chat, 1 stream": lambda u: one_stream(u, CHAT, 128),
             "chat, 16 streams": lambda u: concurrent_streams(u, CHAT, 16, 96)}
    results: dict[str, dict[str, list[float]]] = {c: {"plain": [], "ngram": []} for c in cases}
    accept = {}
    for r in range(args.rounds):
        for label, flags in (("plain", ()), ("ngram", ("--speculative-config", spec))):
            with served(*flags, name=f"spec-bench-{label}") as server:
                one_stream(server.url, COPY[:1] + CHAT[:1], 16)  # warm
                for case, run in cases.items():
                    results[case][label].append(run(server.url))
                    print(f"round {r} {label:6s} {case:18s} {results[case][label][-1]:6.1f} tok/s", flush=True)
                if label == "ngram":
                    m = metrics(server.url)
                    accept = {k: m.get(f"vllm:spec_decode_{k}_total", 0.0)
                              for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    out = {}
    for case, by in results.items():
        plain, ngram = statistics.median(by["plain"]), statistics.median(by["ngram"])
        out[case] = (plain, ngram, ngram / plain)
    return {"cases": out, "last_round_counters": accept}


def random_target(folder: Path, default_dir: Path) -> Path:
    """A random-weight Llama bigger than the default model (hidden 768, 12 layers), the default
    model's tokenizer and vocabulary, saved in float32 (quantized to 4-bit when served)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True,
                                      max_position_embeddings=2048, initializer_range=0.2,
                                      bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(default_dir).save_pretrained(folder)
    return folder


def measure_draft(args) -> dict:
    """The draft = target pair at the exact settings (highest precision, float32 KV: 100% expected
    at temperature 0) and at the defaults."""
    from quantserve.server.loading.default_model import default_model_folder

    settings = {"exact": ("--matmul-precision", "highest", "--kv-cache-dtype", "float32"), "defaults": ()}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        target = random_target(Path(tmp) / "target", default_model_folder())
        spec = f'{{"model": "{target}", "num_speculative_tokens": {args.k_draft}, "draft_cost": 0}}'
        prompts = CHAT[:4]
        for setting, common in settings.items():
            rates: dict[str, list[float]] = {"plain": [], "draft": []}
            counters = {}
            for r in range(args.rounds):
                for label, flags in (("plain", ()), ("draft", ("--speculative-config", spec))):
                    with served("--model", str(target), *common, *flags, name=f"spec-bench-{label}") as server:
                        one_stream(server.url, prompts[:1], 8)
                        rates[label].append(one_stream(server.url, prompts, 64))
                        print(f"round {r} {setting:8s} {label:6s} draft=target, 1 stream {rates[label][-1]:6.1f} tok/s",
                              flush=True)
                        if label == "draft":
                            m = metrics(server.url)
                            counters = {k: counters.get(k, 0.0) + m.get(f"vllm:spec_decode_{k}_total", 0.0)
                                        for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
            plain, draft = statistics.median(rates["plain"]), statistics.median(rates["draft"])
            out[setting] = {"plain": plain, "draft": draft, "cost_per_token": plain / draft, "counters": counters}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=8, help="num_speculative_tokens for n-gram")
    parser.add_argument("--k-draft", type=int, default=4, help="num_speculative_tokens for the draft model")
    parser.add_argument("--skip-draft", action="store_true")
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine

    hold()
    ngram = measure_ngram(args)
    print(f"\nn-gram (k={args.k}), greedy, medians of {args.rounds} rounds, default model on this CPU:")
    for case, (plain, spec, ratio) in ngram["cases"].items():
        print(f"  {case:18s} plain {plain:6.1f} tok/s  ngram {spec:6.1f} tok/s  ratio {ratio:.2f}x")
    c = ngram["last_round_counters"]
    if c.get("num_draft_tokens"):
        print(f"  drafts {c['num_drafts']:.0f}, draft tokens {c['num_draft_tokens']:.0f}, accepted "
              f"{c['num_accepted_tokens']:.0f} ({c['num_accepted_tokens'] / c['num_draft_tokens']:.0%})")
    if not args.skip_draft:
        print(f"\ndraft model = target (random Llama, hidden 768 x 12 layers, 4-bit both), k={args.k_draft}, greedy, "
              "one stream:")
        for setting, d in measure_draft(args).items():
            c = d["counters"]
            rate = c["num_accepted_tokens"] / c["num_draft_tokens"] if c.get("num_draft_tokens") else float("nan")
            print(f"  {setting:8s} acceptance {rate:.1%} ({c.get('num_accepted_tokens', 0):.0f} of "
                  f"{c.get('num_draft_tokens', 0):.0f} draft tokens); plain {d['plain']:.1f} tok/s, with drafts "
                  f"{d['draft']:.1f} tok/s: cost per verified token {d['cost_per_token']:.2f}x the plain one's")


if __name__ == "__main__":
    main()
