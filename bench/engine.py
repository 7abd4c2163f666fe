"""Engine benchmark: generated tokens/s, time to first token and inter-token latency at several
concurrencies, for quantserve's engine and, in the same run and on the same requests:

- hf-generate: transformers' `generate` on the same NF4 model, each group of concurrent requests
  as one left-padded static batch (c = 1: plain single-stream generate);
- hf-generate-fp32: transformers' `generate` on the unquantized float32 model (single stream);
- hf-cb: transformers' continuous batching (`init_continuous_batching`, what `transformers serve
  --continuous-batching` runs) on the same NF4 model, with streaming requests.

Closed loop: C clients, each sending R requests one after another (distinct ~128-token prompts,
greedy, exactly N output tokens: EOS ignored). Default model: the built-in SmolLM2-135M-Instruct.

    python bench/engine.py                                   # CPU, fp32, concurrency 1 4 16 64
    python bench/engine.py --systems quantserve --concurrency 1 16 --rounds 1
    python bench/engine.py --device cuda --dtype bfloat16     # on a GPU machine
    python bench/engine.py --quant int8 --systems quantserve hf-generate --concurrency 1 16
                                                             # LLM.int8 weights (our Linear8bitLt)

    python bench/engine.py --systems quantserve --concurrency 16 --loras 4
                                                             # + "quantserve+lora": the same streams spread
                                                             # over 4 LoRA adapters, against the base alone

--loras N: N random rank---lora-rank adapters on every projection (q/k/v/o/gate/up/down), written in
peft's format and loaded by the engine as `--lora-modules` would; client c asks for adapter c % N.

--quant int8: the quantized model is transformers' with every Linear but the head swapped for our
Linear8bitLt (threshold 6.0, as load_in_8bit); "hf-generate" then runs transformers on those layers.

--quantize-lm-head int8|nf4: the quantized model's output head (and its tied embedding) as the
server's flag makes it (server/engine/models/quantized_head.py); the hf systems then run it too.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

import quantserve.quant as quant  # noqa: E402
from quantserve.server.loading.default_model import default_model_folder  # noqa: E402
from quantserve.server.engine import EngineConfig, SamplingParams  # noqa: E402
from quantserve.server.engine.engine import AsyncEngine  # noqa: E402
from quantserve.server.engine.models.quantized_head import HEAD_QUANTIZATIONS, quantize_lm_head  # noqa: E402
from quantserve.server.engine.models.sixteen_bit import to_16bit  # noqa: E402

SYSTEMS = ("quantserve", "hf-generate", "hf-generate-fp32", "hf-cb", "quantserve+lora")
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
    "father had taught him. There were one hundred and twelve of them, worn smooth in the middle by a "
    "century of boots. At the top he trimmed the wick, polished the great lens with a soft cloth, and "
    "watched the first ships come round the headland. Some nights the fog rolled in so thick that he "
    "could not see his own hands, and on those nights he sounded the horn every thirty seconds until "
    "dawn. The village below knew the rhythm by heart; children fell asleep to it, and fishermen set "
    "their clocks by it. "
)


# ---------------------------------------------------------------------------------- model


def load(folder: Path, device: str, dtype: torch.dtype, quantized: bool, quant_name: str = "nf4",
         lm_head: str = "none"):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    if quantized:
        config = quant.QuantConfig(load_in_8bit=True) if quant_name == "int8" else quant.QuantConfig()
        quant.quantize_model(model, config)
        if lm_head != "none":  # as the server loads it: the head at 16 bits first, then quantized from those
            to_16bit(model)
            quantize_lm_head(model, lm_head)
    return model.eval()


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    text = tokenizer.encode(TEXT * (2 + length // 100), add_special_tokens=False)
    prompts = []
    for i in range(count):
        head = tokenizer.encode(f"Story {i}, told by keeper number {i * 7 + 3}:", add_special_tokens=False)
        start = (i * 11) % 50
        prompts.append((head + text[start:])[:length])
    return prompts


# ---------------------------------------------------------------------------------- metrics


class Recorder:
    """Per request: submit time and (arrival time, tokens) of each streamed piece."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, list[tuple[float, int]]]] = []
        self.lock = threading.Lock()

    def add(self, submitted: float, pieces: list[tuple[float, int]]) -> None:
        with self.lock:
            self.requests.append((submitted, pieces))

    def summary(self, wall: float) -> dict[str, Any]:
        ttft, itl, tokens = [], [], 0
        for submitted, pieces in self.requests:
            pieces = [p for p in pieces if p[1] > 0]
            if not pieces:
                continue
            tokens += sum(n for _, n in pieces)
            ttft.append(pieces[0][0] - submitted)
            if pieces[0][1] > 1:
                itl += [0.0] * (pieces[0][1] - 1)
            for (t0, _), (t1, n) in zip(pieces, pieces[1:]):
                itl += [(t1 - t0) / n] * n
        return {
            "requests": len(self.requests), "output_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_s": percentiles(ttft), "itl_ms": {k: round(v * 1000, 1) for k, v in percentiles(itl).items()},
        }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def pct(p: float) -> float:
        return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]

    return {"p50": round(pct(50), 3), "p90": round(pct(90), 3), "p99": round(pct(99), 3),
            "mean": round(statistics.fmean(values), 3)}


# ---------------------------------------------------------------------------------- systems


def write_adapters(model, count: int, rank: int, folder: Path) -> list[tuple[str, str]]:
    """`count` random LoRA adapters in peft's format (adapter_config.json + adapter_model.safetensors)
    on every projection of every layer; B small, as a trained adapter's update is."""
    from safetensors.torch import save_file

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = []
    for n in range(count):
        g = torch.Generator().manual_seed(n)
        tensors = {}
        for name, module in model.named_modules():
            short = name.rsplit(".", 1)[-1]
            if short in targets:
                key = f"base_model.model.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
        path = folder / f"adapter{n}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "bias": "none"}))
        out.append((f"adapter{n}", str(path)))
    return out


def run_quantserve(model, tokenizer, prompts, concurrency, rounds, max_tokens, args,
                   adapters: Optional[list[tuple[str, str]]] = None) -> dict[str, Any]:
    config = EngineConfig(max_num_seqs=args.max_num_seqs or max(concurrency, 1),
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_memory=args.kv_cache_gib, max_loras=max(1, len(adapters or ())),
                          kv_cache_dtype=args.kv_cache_dtype, forward=args.forward)
    rec = Recorder()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def main() -> float:
        engine = AsyncEngine(model, tokenizer, config)
        await engine.start()
        for name, path in adapters or ():
            engine.loras.load(name, path)

        async def client(c: int) -> None:
            lora = adapters[c % len(adapters)][0] if adapters else None
            for r in range(rounds):
                prompt = prompts[(c * rounds + r) % len(prompts)]
                t0 = time.perf_counter()
                pieces = []
                async for out in engine.generate(prompt, params, f"c{c}-r{r}", lora=lora):
                    pieces.append((time.perf_counter(), sum(len(o.token_ids) for o in out.outputs)))
                rec.add(t0, pieces)

        try:
            # One short request first: the engine's lazily built pieces are warm for everyone.
            async for _ in engine.generate(prompts[0][:8], SamplingParams(max_tokens=2), "warmup"):
                pass
            start = time.perf_counter()
            await asyncio.gather(*[client(c) for c in range(concurrency)])
            return time.perf_counter() - start
        finally:
            await engine.shutdown()

    wall = asyncio.run(main())
    return rec.summary(wall)


class _StepTimes(transformers.LogitsProcessor):
    """Records when each decoding step's logits are ready (one token for every sequence)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf_generate(model, tokenizer, prompts, concurrency, rounds, max_tokens, args) -> dict[str, Any]:
    rec = Recorder()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    for r in range(rounds):
        group = [prompts[(c * rounds + r) % len(prompts)] for c in range(concurrency)]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=model.device)
        steps = _StepTimes()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, pad_token_id=pad, logits_processor=[steps])
        for _ in group:
            rec.add(t0, [(t, 1) for t in steps.times])
    return rec.summary(time.perf_counter() - start)


def run_hf_cb(model, tokenizer, prompts, concurrency, rounds, max_tokens, args) -> dict[str, Any]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256
    per_request = -(-(max(len(p) for p in prompts) + max_tokens) // page)
    cb_config = ContinuousBatchingConfig(
        page_size=page, num_blocks=per_request * concurrency + 4, max_batch_tokens=args.max_num_batched_tokens,
        max_requests_per_batch=max(concurrency, 1),
    )
    gen_config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1,
                                  pad_token_id=tokenizer.pad_token_id)
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.start()
    rec = Recorder()
    inboxes: dict[str, queue.Queue] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def router() -> None:  # one reader of the shared output queue, one inbox per request
        while not stop.is_set():
            result = manager.get_result(timeout=0.05)
            if result is None:
                continue
            now = time.perf_counter()
            with lock:
                box = inboxes.get(result.request_id)
            if box is not None:
                box.put((now, result))

    def client(c: int) -> None:
        for r in range(rounds):
            rid = f"c{c}-r{r}"
            box: queue.Queue = queue.Queue()
            with lock:
                inboxes[rid] = box
            t0 = time.perf_counter()
            manager.add_request(prompts[(c * rounds + r) % len(prompts)], request_id=rid, max_new_tokens=max_tokens,
                                streaming=True, eos_token_id=-1)
            pieces, seen = [], 0
            while True:
                now, result = box.get(timeout=600)
                n = len(result.generated_tokens)
                pieces.append((now, n - seen))
                seen = n
                if result.is_finished():
                    break
            rec.add(t0, pieces)

    route = threading.Thread(target=router, daemon=True)
    route.start()
    try:
        # warm up one request
        manager.add_request(prompts[0][:8], request_id="warmup", max_new_tokens=2, eos_token_id=-1)
        while True:
            res = manager.get_result(timeout=60)
            if res is None or (res.request_id == "warmup" and res.is_finished()):
                break
        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        stop.set()
        route.join()
        manager.stop(block=True, timeout=10)
        manager.destroy()
    return rec.summary(wall)


RUNNERS = {"quantserve": run_quantserve, "hf-generate": run_hf_generate, "hf-generate-fp32": run_hf_generate,
           "hf-cb": run_hf_cb}


# ---------------------------------------------------------------------------------- main


def table(results: dict[str, dict[int, dict[str, Any]]], concurrencies: list[int]) -> str:
    lines = ["| system | " + " | ".join(f"tok/s @{c}" for c in concurrencies)
             + f" | TTFT p50 / p90 @{concurrencies[-1]} (s) | ITL p50 / p90 @{concurrencies[-1]} (ms) |",
             "|---|" + "---|" * (len(concurrencies) + 2)]
    for system, by_c in results.items():
        cells = [f"{by_c[c]['tokens_per_s']}" if c in by_c else "-" for c in concurrencies]
        last = by_c.get(concurrencies[-1]) or by_c[max(by_c)]
        tt, it = last["ttft_s"], last["itl_ms"]
        lines.append(f"| {system} | " + " | ".join(cells)
                     + f" | {tt.get('p50')} / {tt.get('p90')} | {it.get('p50')} / {it.get('p90')} |")
    return "\n".join(lines)


def no_amx() -> None:
    """Benchmark switch (not a serving option): prompt rows of the fused step on the AVX-512 kernel
    instead of AMX tiles, to measure what AMX brings."""
    from quantserve.kernels.cpu import amx

    amx.available = lambda: False


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF folder (default: the built-in default model)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"],
                        help="quantserve's --kv-cache-dtype (auto: bfloat16 on a CPU with the native attention)")
    parser.add_argument("--max-num-seqs", type=int, default=0,
                        help="quantserve's max_num_seqs (default 0: the concurrency, so that no request queues; "
                        "give the server's default to see the queueing a server would have)")
    parser.add_argument("--hf-max-concurrency", type=int, default=64,
                        help="skip the transformers systems above this concurrency (they are slow)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--matmul-precision", default="medium", choices=["highest", "high", "medium"],
                        help="torch's float32 matmul precision for quantserve (the server's default: medium); "
                        "the transformers systems run at torch's default, highest, which is faster for them")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "int8"], help="weight format (default nf4)")
    parser.add_argument("--quantize-lm-head", default="none", choices=HEAD_QUANTIZATIONS,
                        help="the quantized model's output head, as the server's flag (default none: 16-bit)")
    parser.add_argument("--loras", type=int, default=0,
                        help="also run quantserve+lora: the streams spread over this many LoRA adapters")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--forward", default="auto", choices=["auto", "fused", "layers", "transformers"],
                        help="quantserve's forward path, as the server's --forward")
    parser.add_argument("--no-amx", action="store_true",
                        help="the fused step's prompt rows on the AVX-512 kernel instead of AMX tiles")
    args = parser.parse_args(argv)
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    if args.no_amx:
        no_amx()
    if args.loras and "quantserve+lora" not in args.systems:
        args.systems.append("quantserve+lora")
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))

    folder = args.model or default_model_folder()  # the loader's converted, cached copy
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = make_prompts(tokenizer, max(args.concurrency) * args.rounds, args.prompt_tokens)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, device {args.device}, "
          f"{dtype}, {args.quant} weights, output head {args.quantize_lm_head}, quantserve's matmul precision {args.matmul_precision}; "
          f"prompts {args.prompt_tokens} tokens, "
          f"{args.max_tokens} output tokens, "
          f"{args.rounds} requests per client"
          + (f", quantserve's max_num_seqs {args.max_num_seqs}" if args.max_num_seqs else "")
          + f", quantserve's KV cache dtype {args.kv_cache_dtype}, forward {args.forward}"
          + (", no AMX" if args.no_amx else ""), flush=True)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    quantized = None
    adapters: list[tuple[str, str]] = []
    for system in args.systems:
        if system == "hf-generate-fp32":
            model = load(folder, args.device, dtype, quantized=False)
        else:
            quantized = quantized or load(folder, args.device, dtype, quantized=True, quant_name=args.quant,
                                          lm_head=args.quantize_lm_head)
            model = quantized
        for c in args.concurrency:
            if system.startswith("hf") and c > args.hf_max_concurrency:
                continue
            if system == "hf-generate-fp32" and c != 1:
                continue
            torch.set_float32_matmul_precision(args.matmul_precision if system.startswith("quantserve") else "highest")
            if system == "quantserve+lora":
                if not adapters:
                    import tempfile

                    adapters = write_adapters(model, max(args.loras, 1), args.lora_rank, Path(tempfile.mkdtemp()))
                res = run_quantserve(model, tokenizer, prompts, c, args.rounds, args.max_tokens, args, adapters)
                base = results.get("quantserve", {}).get(c)
                if base:
                    res["vs_base"] = round(res["tokens_per_s"] / base["tokens_per_s"], 3)
            else:
                res = RUNNERS[system](model, tokenizer, prompts, c, args.rounds, args.max_tokens, args)
            results.setdefault(system, {})[c] = res
            print(f"{system:18s} c={c:<3d} {res['tokens_per_s']:8.1f} tok/s  TTFT p50 {res['ttft_s'].get('p50')} s  "
                  f"ITL p50 {res['itl_ms'].get('p50')} ms  ({res['output_tokens']} tokens in {res['wall_s']} s)"
                  + (f"  {res['vs_base']}x the base" if "vs_base" in res else ""), flush=True)
        if system == "hf-generate-fp32":
            del model
            gc.collect()
    print()
    print(table(results, args.concurrency))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
