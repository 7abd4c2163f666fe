"""Structured-output benchmark: generated tokens/s at several concurrencies with every request
constrained by a JSON schema vs the same requests unconstrained (goal: >= 0.9x), and the time to
compile a schema against the model's vocabulary.

Same engine, model (the built-in SmolLM2-135M-Instruct, NF4), prompts and closed loop as
bench/engine.py: C clients each sending R requests one after another, greedy, up to N output
tokens. The modes alternate within each concurrency (free, json, free, json, ...) so that a
machine whose load drifts penalizes both alike; the ratio is of the summed tokens over the summed
wall times. The schema (records with nested arrays and enums, no length bounds) lets the model
write up to N tokens of JSON. It also reports the grammar's own work per decode step (CPU time, no model), the
figure that stays meaningful on a machine shared with other work.

    python bench/structured.py                       # concurrency 1 16, 3 repeats
    python bench/structured.py --masks-only          # compile times and per-step grammar work only
    python bench/structured.py --concurrency 1 4 16 --repeats 5 --json out.json
    python bench/structured.py --battery             # issue 25's battery on a real server (see below)
    python bench/structured.py --delays 5            # big grammar requests vs another client's latency

--battery starts `quantserve serve` on the default model and runs bench/structured_battery.py (parse
with a City model, json_object, tool_choice required and named; temperature 0; max_tokens 64 and
200): does every constrained answer parse and validate, with what finish_reason and how many
tokens. Measured here (2-core CPU, shared): all 8 parse; see the docstring of structured_battery.py.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402

from engine import Recorder, load, make_prompts  # noqa: E402  (bench/engine.py)
from quantserve.server.engine import EngineConfig, SamplingParams  # noqa: E402
from quantserve.server.engine.engine import AsyncEngine  # noqa: E402
from quantserve.server.engine.grammar import GrammarCompiler, StructuredOutput  # noqa: E402
from quantserve.server.loading.default_model import default_model_folder  # noqa: E402

RECORDS = {
    "type": "object",
    "properties": {
        "records": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0},
                "title": {"type": "string"},
                "status": {"enum": ["open", "closed", "pending"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "score": {"type": "number"},
            },
            "required": ["id", "title", "status", "tags"],
            "additionalProperties": False,
        }},
    },
    "required": ["records"],
    "additionalProperties": False,
}

# Schemas for the compile-time figures (bench only: the server compiles on first use and caches).
COMPILE_SCHEMAS = {
    "flat (2 fields)": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"]},
    "records (nested, enums)": RECORDS,
    "bounded (patterns, ranges, maxItems)": {
        "type": "object",
        "properties": {
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "name": {"type": "string", "maxLength": 20},
        },
        "required": ["zip", "age", "tags", "name"],
    },
}


def run(engine: AsyncEngine, prompts, concurrency: int, rounds: int, params: SamplingParams, tag: str) -> dict:
    rec = Recorder()

    async def main() -> float:
        async def client(c: int) -> None:
            for r in range(rounds):
                prompt = prompts[(c * rounds + r) % len(prompts)]
                t0 = time.perf_counter()
                pieces = []
                async for out in engine.generate(prompt, params, f"{tag}-c{c}-r{r}"):
                    pieces.append((time.perf_counter(), sum(len(o.token_ids) for o in out.outputs)))
                rec.add(t0, pieces)

        start = time.perf_counter()
        await asyncio.gather(*[client(c) for c in range(concurrency)])
        return time.perf_counter() - start

    return rec.summary(engine_loop.run_until_complete(main()))


engine_loop = asyncio.new_event_loop()


def compile_times(tokenizer, vocab: int, eos: set[int]) -> dict[str, Any]:
    compiler = GrammarCompiler(tokenizer, vocab, eos)
    t0 = time.perf_counter()
    compiler.mask_vocab_size  # builds llguidance's tokenizer view, once per server
    figures: dict[str, Any] = {"tokenizer_setup_ms": round((time.perf_counter() - t0) * 1000, 1)}
    for name, schema in COMPILE_SCHEMAS.items():
        spec = StructuredOutput.json_schema(schema)
        t0 = time.perf_counter()
        compiler.check(spec)
        compiled = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiler.check(spec)
        cached = time.perf_counter() - t0
        # A request's first mask: the matcher and its lexer are built lazily.
        import llguidance.torch as llt

        t0 = time.perf_counter()
        matcher = compiler.matcher(spec)
        mask = llt.allocate_token_bitmask(1, compiler.mask_vocab_size)
        llt.fill_next_token_bitmask(matcher, mask, 0)
        first_mask = time.perf_counter() - t0
        figures[name] = {"compile_ms": round(compiled * 1000, 2), "cached_ms": round(cached * 1000, 3),
                         "first_mask_ms": round(first_mask * 1000, 2)}
    return figures


def mask_cost(tokenizer, vocab: int, eos: set[int], rows: int) -> dict[str, float]:
    """The grammar's own work per decode step, without the model: `rows` matchers replaying a real
    JSON answer to RECORDS (catch-up + mask fill + applying the masks to [rows, V] logits), in
    CPU seconds of this process, so that other load on the machine does not count."""
    from quantserve.server.engine.grammar import GrammarBank
    from quantserve.server.engine.sequence import Sequence

    record = {"id": 17, "title": "Fix the login page", "status": "open", "tags": ["web", "auth"], "score": 0.5}
    answer = tokenizer.encode(json.dumps({"records": [dict(record, id=i) for i in range(4)]}))
    bank = GrammarBank(GrammarCompiler(tokenizer, vocab, eos))
    spec = StructuredOutput.json_schema(RECORDS)
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=len(answer) + 1, structured=spec))
            for i in range(rows)]
    logits = torch.randn(rows, vocab)
    bank.apply(logits, *bank.fill(seqs))  # matchers built (the first step of a request)
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    for token in answer:
        for seq in seqs:
            seq.append_token(token)
        bank.apply(logits, *bank.fill(seqs))
    steps = len(answer)
    return {"rows": rows, "steps": steps, "cpu_ms_per_step": round((time.process_time() - t_cpu) / steps * 1000, 3),
            "wall_ms_per_step": round((time.perf_counter() - t_wall) / steps * 1000, 3)}


def battery(max_tokens: list[int]) -> list[dict[str, Any]]:
    """Issue 25's battery on a real server: one row per (case, max_tokens)."""
    from quantserve.server.testing import ServerProcess
    from structured_battery import BATTERY, run_case  # bench/structured_battery.py

    rows = []
    with ServerProcess("--kv-cache-memory", "0.25") as server:
        print("| case | max_tokens | parses | finish_reason | tokens | s | answer |")
        print("|---|---|---|---|---|---|---|")
        for budget in max_tokens:
            for case in BATTERY:
                r = run_case(server.client(), case, budget)
                rows.append(dataclasses.asdict(r))
                print(f"| {r.case} | {r.max_tokens} | {'yes' if r.ok else 'NO'} | {r.finish_reason} | "
                      f"{r.completion_tokens} | {r.seconds:.1f} | `{r.detail[:80]}` |", flush=True)
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} constrained answers parse and validate")
    return rows


BIG_BODIES = {
    # 2.4 MB: refused by --max-grammar-choices, after the body is read and parsed
    "100k_choices": {"choice": [f"option number {i:06d}" for i in range(100_000)]},
    # allowed; ~0.5-3 s to compile on a 2-core CPU
    "slow_schema": {"json": {"type": "object", "properties": {
        f"k_{i}": {"type": "string", "description": "d" * 90} for i in range(2500)}}},
}


def delays(repeats: int) -> list[dict[str, Any]]:
    """Issue 25's "one request freezes everyone": how much a big grammar request delays another
    client's /health and first token on a real server. Per kind: the big body (pre-encoded) sent
    `repeats` times in a row from one thread while another polls /health every 20 ms and a third
    times 4-token streamed chats; the first tokens' median against the same chats alone."""
    import threading

    import httpx

    from quantserve.server.testing import ServerProcess

    question = [{"role": "user", "content": "What is the capital of France?"}]

    def first_token(client) -> float:
        start = time.perf_counter()
        stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=4,
                                                temperature=0, stream=True)
        took = None
        for chunk in stream:
            if took is None and chunk.choices and chunk.choices[0].delta.content:
                took = time.perf_counter() - start
        return took if took is not None else time.perf_counter() - start

    rows = []
    with ServerProcess("--kv-cache-memory", "0.25") as server:
        client = server.client()
        alone = statistics.median(first_token(client) for _ in range(5))
        for kind, so in BIG_BODIES.items():
            raw = json.dumps({"model": "SmolLM2-135M-Instruct", "messages": question, "max_tokens": 2,
                              "temperature": 0, "structured_outputs": so}).encode()
            done = threading.Event()
            health: list[float] = []
            statuses: list[int] = []

            def big() -> None:
                with httpx.Client(timeout=120) as http:
                    for _ in range(repeats):
                        statuses.append(http.post(server.url + "/v1/chat/completions", content=raw,
                                                  headers={"Content-Type": "application/json"}).status_code)
                done.set()

            def poll() -> None:
                with httpx.Client(timeout=60) as http:
                    while not done.is_set():
                        start = time.perf_counter()
                        http.get(server.url + "/health")
                        health.append(time.perf_counter() - start)
                        time.sleep(0.02)

            threads = [threading.Thread(target=big), threading.Thread(target=poll)]
            for t in threads:
                t.start()
            during = []
            while not done.is_set():
                during.append(first_token(client))
            for t in threads:
                t.join()
            row = {"kind": kind, "statuses": sorted(set(statuses)), "health_worst_ms": round(max(health) * 1e3),
                   "health_p50_ms": round(statistics.median(health) * 1e3),
                   "first_token_alone_ms": round(alone * 1e3),
                   "first_token_during_p50_ms": round(statistics.median(during) * 1e3),
                   "first_token_during_worst_ms": round(max(during) * 1e3), "chats_during": len(during)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--rounds", type=int, default=1, help="requests each client sends, one after another")
    parser.add_argument("--repeats", type=int, default=3, help="free/json alternations per concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--masks-only", action="store_true", help="only the compile times and the grammar's work "
                        "per step (no model runs)")
    parser.add_argument("--battery", action="store_true", help="only issue 25's battery on a real server "
                        "(bench/structured_battery.py) at max_tokens 64 and 200")
    parser.add_argument("--delays", type=int, default=0, metavar="REPEATS",
                        help="only how much big grammar requests (each sent REPEATS times) delay another client's "
                        "/health and first token on a real server")
    args = parser.parse_args(argv)
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    if args.delays:
        rows = delays(args.delays)
        if args.json:
            args.json.write_text(json.dumps({"delays": rows}, indent=2))
        return 0
    if args.battery:
        rows = battery([64, 200])
        if args.json:
            args.json.write_text(json.dumps({"battery": rows}, indent=2))
        return 0 if all(r["ok"] for r in rows) else 1
    torch.set_float32_matmul_precision("medium")  # the server's default
    folder = default_model_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = load(folder, "cpu", torch.float32, quantized=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"prompts {args.prompt_tokens} tokens, up to {args.max_tokens} output tokens, greedy, "
          f"{args.repeats} alternations per concurrency", flush=True)
    chat = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"List the open tickets of project {i} as JSON records."}],
        add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(max(args.concurrency))]
    prompts = [list(c) + p[: max(0, args.prompt_tokens - len(c))]
               for c, p in zip(chat, make_prompts(tokenizer, len(chat), args.prompt_tokens))]
    figures = compile_times(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    print("compile:", json.dumps(figures), flush=True)
    costs = [mask_cost(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, c) for c in args.concurrency]
    for cost in costs:
        print("grammar work per step:", json.dumps(cost), flush=True)
    if args.masks_only:
        return 0

    modes = {
        "free": SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True),
        "json": SamplingParams(max_tokens=args.max_tokens, temperature=0,
                               structured=StructuredOutput.json_schema(RECORDS)),
    }
    results: dict[int, dict[str, Any]] = {}
    for c in args.concurrency:
        engine = AsyncEngine(model, tokenizer, EngineConfig(max_num_seqs=max(c, 1)))
        engine_loop.run_until_complete(engine.start())
        run(engine, prompts, 1, 1, modes["json"], "warmup")  # first matcher / lexer built, kernels warm
        runs: dict[str, list[dict]] = {"free": [], "json": []}
        for rep in range(args.repeats):
            for mode, params in modes.items():
                res = run(engine, prompts, c, args.rounds, params, f"{mode}{rep}")
                runs[mode].append(res)
                print(f"c={c:<3d} {mode}  {res['tokens_per_s']:7.1f} tok/s  ({res['output_tokens']} tokens in "
                      f"{res['wall_s']} s)", flush=True)
        engine_loop.run_until_complete(engine.shutdown())
        rate = {m: sum(r["output_tokens"] for r in rs) / sum(r["wall_s"] for r in rs) for m, rs in runs.items()}
        results[c] = {"free_tok_s": round(rate["free"], 1), "json_tok_s": round(rate["json"], 1),
                      "ratio": round(rate["json"] / rate["free"], 3),
                      "ratio_per_repeat": [round(j["tokens_per_s"] / f["tokens_per_s"], 3)
                                           for f, j in zip(runs["free"], runs["json"])],
                      "json_itl_p50_ms": statistics.median(r["itl_ms"].get("p50", 0) for r in runs["json"]),
                      "free_itl_p50_ms": statistics.median(r["itl_ms"].get("p50", 0) for r in runs["free"])}
        print(f"c={c:<3d} json/free = {results[c]['ratio']}  per repeat {results[c]['ratio_per_repeat']}", flush=True)
    print()
    print("| streams | unconstrained tok/s | JSON schema tok/s | ratio | ITL p50 free / json (ms) |")
    print("|---|---|---|---|---|")
    for c, r in results.items():
        print(f"| {c} | {r['free_tok_s']} | {r['json_tok_s']} | {r['ratio']} | "
              f"{r['free_itl_p50_ms']} / {r['json_itl_p50_ms']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "compile": figures,
                                         "mask_cost": costs, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
