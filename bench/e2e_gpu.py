"""End-to-end decode on a Llama-3-8B-shaped model with random weights: our NF4 vs bitsandbytes vs bf16.

    python bench/e2e_gpu.py [--parts layers hf engine] [--layers 32] [--prompt-len 128]
                            [--new-tokens 128] [--concurrency 64] [--no-double-quant] [--compile] [--out FILE]

The model is built from Llama-3-8B's config (hidden 4096, 32 layers, 32 heads / 8 KV heads,
intermediate 14336, vocab 128256) with random bf16 weights on the GPU; NF4 variants quantize every
Linear but lm_head (blocksize 64, double quantization unless --no-double-quant). Parts, each
standalone (one failing prints why and the others still run):

- layers: one decoder layer's seven Linears (q, k, v, o, gate, up, down) replayed in a CUDA graph
  over all layers' weights, at 1 and --concurrency rows: ours NF4 vs bitsandbytes NF4 vs bf16
  dense, and the decode tokens/s the Linears alone would allow (an upper bound of the whole step).
- hf: transformers generate() (greedy, fixed length): batch-1 decode tokens/s and generated tokens/s
  for --concurrency prompts in one batch, for transformers + bitsandbytes (its Linear4bit swapped in),
  transformers + our Linear4bit, and transformers bf16. --compile adds a static cache and
  torch.compile(mode="reduce-overhead").
- engine: our server.engine.AsyncEngine (imported lazily; skipped with a message when it is not
  there or does not start) with the NF4 and the bf16 model: batch-1 decode tokens/s of one request
  and generated tokens/s of --concurrency concurrent requests.

Prints markdown tables; all numbers come from this one run on one GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import statistics
import sys
import time
import traceback
from typing import Callable

import torch
from torch import nn

DEVICE = "cuda"
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sync() -> None:
    torch.cuda.synchronize()


def build_model(num_layers: int) -> nn.Module:
    """LlamaForCausalLM with Llama-3-8B's shapes and random bf16 weights, on the GPU."""
    import transformers

    config = transformers.LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": num_layers})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def quantize_ours(model: nn.Module, double_quant: bool) -> nn.Module:
    import quantserve.quant as quant

    quant.quantize_model(model, quant.QuantConfig(bnb_4bit_use_double_quant=double_quant,
                                                  bnb_4bit_compute_dtype=torch.bfloat16))
    return model


def quantize_bnb(model: nn.Module, double_quant: bool) -> nn.Module:
    """Swap every Linear but lm_head for bitsandbytes' Linear4bit (what transformers' integration does)."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name == "lm_head":
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                           compress_statistics=double_quant, blocksize=64).to(DEVICE)
            if child.bias is not None:
                new.bias = child.bias
            setattr(parent, name, new)
    return model


def model_gib(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**30


# ----------------------------------------------------------------------------------------------
# part 1: the Linears of a decoder layer, CUDA-graph timed


def graph_time_ms(fn: Callable[[], object], replays: int = 20) -> tuple[float, bool]:
    """(median ms of fn, whether it ran as a CUDA graph); eager when it cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    sync()
    run, graphed = fn, False
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly
        sync()
    else:
        run, graphed = graph.replay, True
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), graphed


def linears_of(model: nn.Module) -> list[nn.Module]:
    out = []
    for layer in model.model.layers:
        out += [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    return out


def part_layers(base: nn.Module, args, report: list[str]) -> None:
    rows = sorted({1, args.concurrency})
    results: dict[str, dict[int, tuple[float, bool]]] = {}
    variants = {
        "bf16 dense (cuBLAS)": lambda m: m,
        "bitsandbytes NF4": lambda m: quantize_bnb(m, args.double_quant),
        "ours NF4": lambda m: quantize_ours(m, args.double_quant),
    }
    for label, make in variants.items():
        model = make(copy.deepcopy(base)) if label != "bf16 dense (cuBLAS)" else base
        mods = linears_of(model)
        results[label] = {}
        for M in rows:
            xs = {d: torch.randn(M, d, device=DEVICE, dtype=torch.bfloat16) for d in {m.in_features for m in mods}}

            def step(mods=mods, xs=xs):
                for mod in mods:
                    mod(xs[mod.in_features])

            with torch.inference_mode():
                results[label][M] = graph_time_ms(step, args.replays)
        del model, mods
        gc.collect()
        torch.cuda.empty_cache()
    n_layers = len(base.model.layers)
    report.append(f"\n### Decoder Linears only ({n_layers} layers x 7 Linears, CUDA graph; lm_head excluded)\n")
    report.append("| implementation | " + " | ".join(f"M={m} ms/step | tokens/s bound" for m in rows) + " |")
    report.append("|---|" + "---|---|" * len(rows))
    dense = results["bf16 dense (cuBLAS)"]
    for label, per_m in results.items():
        cells = []
        for m in rows:
            ms, graphed = per_m[m]
            mark = "" if graphed else "*"
            cells.append(f"{ms:.2f}{mark} ({dense[m][0] / ms:.2f}x dense) | {1e3 * m / ms:.0f}")
        report.append(f"| {label} | " + " | ".join(cells) + " |")
    report.append("\n`*` = could not be captured in a CUDA graph; timed eagerly (includes launch overhead).")


# ----------------------------------------------------------------------------------------------
# part 2: transformers generate()


def hf_generate_rates(model: nn.Module, args) -> tuple[float, float]:
    """(batch-1 decode tokens/s, generated tokens/s with --concurrency prompts in one batch)."""
    vocab = model.config.vocab_size
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if args.compile:
        gen["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    try:
        return _hf_rates(model, args, vocab, gen)
    finally:
        if args.compile:
            del model.forward  # back to the class's forward
            torch._dynamo.reset()


def _hf_rates(model: nn.Module, args, vocab: int, gen: dict) -> tuple[float, float]:
    def run(batch: int, new_tokens: int) -> float:
        ids = torch.randint(1000, vocab - 1000, (batch, args.prompt_len), device=DEVICE)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, **gen)
        sync()
        if out.shape[1] != args.prompt_len + new_tokens:
            raise RuntimeError(f"generate() returned {out.shape[1] - args.prompt_len} new tokens, not {new_tokens}")
        return time.perf_counter() - t0

    run(1, 4)  # warm-up (allocations, autotuning, compilation)
    prefill = min(run(1, 1) for _ in range(2))
    total = run(1, args.new_tokens)
    decode_rate = (args.new_tokens - 1) / max(total - prefill, 1e-9)
    run(args.concurrency, 4)
    batch_total = run(args.concurrency, args.new_tokens)
    return decode_rate, args.concurrency * args.new_tokens / batch_total


def part_hf(base: nn.Module, args, report: list[str]) -> None:
    report.append(f"\n### transformers generate() (prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy"
                  f"{', static cache + torch.compile' if args.compile else ', eager'})\n")
    report.append(f"| model | weights GiB | batch-1 decode tok/s | generated tok/s at batch {args.concurrency} |")
    report.append("|---|---|---|---|")
    variants = {
        "transformers bf16": lambda m: m,
        "transformers + bitsandbytes NF4": lambda m: quantize_bnb(m, args.double_quant),
        "transformers + ours NF4": lambda m: quantize_ours(m, args.double_quant),
    }
    for label, make in variants.items():
        try:
            model = base if label == "transformers bf16" else make(copy.deepcopy(base))
            decode, batched = hf_generate_rates(model, args)
            report.append(f"| {label} | {model_gib(model):.1f} | {decode:.1f} | {batched:.0f} |")
        except Exception as exc:  # noqa: BLE001 - report it, keep benchmarking the rest
            traceback.print_exc()
            report.append(f"| {label} | - | failed: {type(exc).__name__}: {exc} | - |")
        model = None
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# part 3: our engine


async def engine_rates(model: nn.Module, args) -> tuple[float, float]:
    from quantserve.server.engine import AsyncEngine, EngineConfig, SamplingParams

    engine = AsyncEngine(model, None, EngineConfig(max_num_seqs=max(args.concurrency, 1), enable_prefix_caching=False))
    await engine.start()
    vocab = model.config.vocab_size
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)

    async def one(request_id: str) -> tuple[int, float, float]:
        prompt = torch.randint(1000, vocab - 1000, (args.prompt_len,), generator=generator).tolist()
        t0 = time.perf_counter()
        first = None
        tokens = 0
        async for out in engine.generate(prompt, params, request_id):
            tokens += sum(len(o.token_ids) for o in out.outputs)
            if first is None and tokens:
                first = time.perf_counter()
        return tokens, (first or t0) - t0, time.perf_counter() - t0

    try:
        await one("warmup")
        tokens, ttft, total = await one("single")
        decode_rate = (tokens - 1) / max(total - ttft, 1e-9)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(f"c{i}") for i in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        return decode_rate, sum(r[0] for r in results) / elapsed
    finally:
        await engine.shutdown()


def part_engine(base: nn.Module, args, report: list[str]) -> None:
    report.append(f"\n### quantserve engine (prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy)\n")
    try:
        import quantserve.server.engine as engine_pkg

        engine_pkg.AsyncEngine  # noqa: B018 - the engine module itself imports lazily
    except Exception as exc:  # noqa: BLE001 - not written yet, or broken: say so and skip
        report.append(f"skipped: server.engine is not available ({type(exc).__name__}: {exc})")
        return
    report.append(f"| model | batch-1 decode tok/s | generated tok/s, {args.concurrency} concurrent requests |")
    report.append("|---|---|---|")
    variants = {
        "engine bf16": lambda m: m,
        "engine + ours NF4": lambda m: quantize_ours(m, args.double_quant),
    }
    for label, make in variants.items():
        try:
            model = make(copy.deepcopy(base))
            decode, concurrent = asyncio.run(engine_rates(model, args))
            report.append(f"| {label} | {decode:.1f} | {concurrent:.0f} |")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            report.append(f"| {label} | failed: {type(exc).__name__}: {exc} | - |")
        model = None
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["layers", "hf", "engine"], choices=["layers", "hf", "engine"])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    parser.add_argument("--compile", action="store_true", help="hf part: static cache + torch.compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    if not torch.cuda.is_available():
        sys.exit("bench/e2e_gpu.py needs a CUDA or ROCm GPU")

    import bitsandbytes as bnb
    import transformers

    from quantserve.quant.backends import triton as backend

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    base = build_model(args.layers)
    report = [
        f"# End to end, Llama-3-8B shapes ({args.layers} layers), random weights, on {props.name}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb.__version__}; "
        f"NF4 blocksize 64, double quant {args.double_quant}, compute bf16; bf16 model {model_gib(base):.1f} GiB",
        f"backend: {backend.status()}",
    ]
    parts = {"layers": part_layers, "hf": part_hf, "engine": part_engine}
    for name in args.parts:
        try:
            parts[name](base, args, report)
        except Exception as exc:  # noqa: BLE001 - one part failing must not hide the others
            traceback.print_exc()
            report.append(f"\n### {name}: failed: {type(exc).__name__}: {exc}")
        print(f"  done part {name}", file=sys.stderr)
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
