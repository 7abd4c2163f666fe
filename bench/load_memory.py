"""Peak memory and time of a streaming 4-bit / 8-bit load, against the final footprint and the 16-bit size.

    python bench/load_memory.py                       # default model + a random 1.1B Llama, CPU
    python bench/load_memory.py --params-1b 0         # default model only
    python bench/load_memory.py --peers               # also transformers + bitsandbytes loading the same
    python bench/load_memory.py --device cuda         # peak device memory too
    python bench/load_memory.py --only int8           # only the int8 (LLM.int8) rows

Each load runs in a fresh process, so its peak RSS is its own: "peak" is the high-water mark of
RSS during the load minus RSS just before it (imports done), "final" the bytes of the loaded
model's tensors. The 1.1B model is TinyLlama-shaped (hidden 2048, 22 layers, vocab 32000) with
random bf16 weights written on the fly: speed and memory do not depend on the weight values.
int8 rows also give the quantized layers' bits per parameter (int8 rows + float32 row scales)
against the theory, 8 + 32 / in_features per weight (~8.06 for the default model, ~8.01 at 2048+).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def make_random_llama(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """Write a random Llama-shaped bf16 checkpoint in ~1 GiB shards without holding it whole."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    config = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 512), tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in tf.LlamaForCausalLM(config).named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if size > 2**30:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += shape.numel() * 2
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in names:
            shape = shapes[n]
            if n.endswith("norm.weight"):
                tensors[n] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[n] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del tensors
    total = sum(s.numel() * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return sum(s.numel() for s in shapes.values())


def int8_bits(model) -> tuple[float, float] | None:
    """(bits per parameter of the int8 layers as loaded, the theory), ours or bitsandbytes'; None
    when the model has none."""
    bits = params = theory = 0.0
    for module in model.modules():
        if type(module).__name__ != "Linear8bitLt":
            continue
        scb = getattr(module.weight, "SCB", None)
        n = module.weight.numel()
        bits += 8 * n + 32 * scb.numel()
        params += n
        theory += n * (8 + 32 / module.in_features)
    return (bits / params, theory / params) if params else None


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one load, one JSON line on stdout."""
    import logging

    import torch

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import quantserve.quant as quant
    from quantserve.quant.convert import model_nbytes
    from quantserve.server.loading.loader import LoadConfig, load_model
    from quantserve.server.loading.peak_memory import PeakMemory

    if args.quant == "int8":
        q = quant.QuantConfig(load_in_8bit=True)
    else:
        q = None if args.quant == "none" else quant.QuantConfig(
            bnb_4bit_quant_type=args.quant, bnb_4bit_use_double_quant=args.double_quant
        )
    model = None if args.model == "default" else args.model
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.engine == "quantserve":
        # Imports and a tiny first quantization (kernel set-up) are not part of the load.
        quant.quantize_4bit(torch.randn(64, 64, device=device))
        config = LoadConfig(model, device=device, dtype=args.dtype, quant=q, cache_dir=args.cache_dir, progress=False)
        result = load_model(config)
        r = result.report
        out = dict(
            seconds=r.load_seconds, peak=r.peak_rss - r.rss_before, final=r.weight_bytes, params=r.num_params,
            grew=r.rss_after - r.rss_before, device_peak=r.device_peak_bytes, device_final=r.device_bytes,
            int8_bits=int8_bits(result.model),
        )
    else:
        import transformers as tf

        from quantserve.server.loading.default_model import default_model_folder

        folder = default_model_folder(args.cache_dir) if model is None else model
        kwargs = {}
        if q is not None and q.load_in_8bit:
            kwargs["quantization_config"] = tf.BitsAndBytesConfig(load_in_8bit=True)
        elif q is not None:
            kwargs["quantization_config"] = tf.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
                bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=torch.float32,
            )
        dtype = getattr(torch, args.dtype) if args.dtype else torch.float32 if device.type == "cpu" else torch.bfloat16
        start = time.perf_counter()
        with PeakMemory(device) as mem:
            device_map = None if device.type == "cpu" else str(device)
            m = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map, **kwargs)
        params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in m.parameters())
        out = dict(
            seconds=time.perf_counter() - start, peak=mem.peak_rss - mem.rss_before, final=model_nbytes(m),
            params=params, grew=mem.rss_after - mem.rss_before, device_peak=mem.device_peak,
            device_final=None if mem.device_after is None else mem.device_after - mem.device_before,
            int8_bits=int8_bits(m),
        )
    print("RESULT " + json.dumps(out))


def run_child(
    model: str, quant: str, double_quant: bool, dtype: str | None, engine: str, device: str | None, cache_dir: str | None
) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--quant", quant, "--engine", engine]
    cmd += ["--dtype", dtype] if dtype else []
    cmd += ["--double-quant"] if double_quant else []
    cmd += ["--device", device] if device else []
    cmd += ["--cache-dir", cache_dir] if cache_dir else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-1b", type=int, default=1, help="also a random 1.1B Llama (0: skip)")
    parser.add_argument("--peers", action="store_true", help="also transformers + bitsandbytes on the same models")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--cache-dir", help="quantserve cache ($QUANTSERVE_CACHE)")
    parser.add_argument("--workdir", help="where to write the random model (default: a temp dir)")
    parser.add_argument("--only", choices=["nf4", "int8"], help="only the 4-bit (and unquantized) or only the int8 rows")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--quant", default="nf4", help=argparse.SUPPRESS)
    parser.add_argument("--double-quant", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="quantserve", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        models = [("SmolLM2-135M (default)", "default")]
        if args.params_1b:
            folder = Path(tmp) / "random-llama-1.1b"
            start = time.perf_counter()
            n = make_random_llama(folder, hidden=2048, layers=22, intermediate=5632, vocab=32000)
            print(f"wrote a random {n / 1e9:.2f}B-parameter Llama (bf16, {n * 2 / MIB:,.0f} MiB) in {time.perf_counter() - start:.0f} s")
            models.append((f"random Llama {n / 1e9:.1f}B", str(folder)))
        # (loader, quant, double quant, dtype of the unquantized tensors; None: the device's default)
        cases = [
            ("quantserve", "nf4", False, None),
            ("quantserve", "nf4", True, None),
            ("quantserve", "nf4", False, "bfloat16"),
            ("quantserve", "none", False, None),
            ("quantserve", "int8", False, None),
        ]
        if args.peers:
            cases += [("transformers+bnb", "nf4", False, None), ("transformers+bnb", "int8", False, None)]
        if args.only:
            cases = [c for c in cases if (c[1] == "int8") == (args.only == "int8")]
        header = (
            f"{'model':<24} {'loader':<17} {'quant':<9} {'params':>7} {'16-bit':>9} {'final':>9} "
            f"{'peak RSS':>9} {'peak/final':>10} {'seconds':>8} {'int8 bits/param (theory)':>25}"
        )
        if args.device == "cuda":
            header += f" {'dev peak':>9} {'dev final':>9}"
        print(header)
        for label, model in models:
            for engine, quant, dq, dtype in cases:
                r = run_child(model, quant, dq, dtype, engine, args.device, args.cache_dir)
                name = quant + ("+dq" if dq else "") + (" bf16" if dtype == "bfloat16" else "")
                line = (
                    f"{label:<24} {engine:<17} {name:<9} {r['params'] / 1e6:>6.0f}M {r['params'] * 2 / MIB:>7,.0f}Mi "
                    f"{r['final'] / MIB:>7,.0f}Mi {r['peak'] / MIB:>7,.0f}Mi {r['peak'] / r['final']:>10.2f} {r['seconds']:>8.1f}"
                )
                bits = r.get("int8_bits")
                line += f" {f'{bits[0]:.4f} ({bits[1]:.4f})' if bits else '-':>25}"
                if r.get("device_peak") is not None:
                    line += f" {r['device_peak'] / MIB:>7,.0f}Mi {r['device_final'] / MIB:>7,.0f}Mi"
                print(line, flush=True)
    print("peak RSS: high-water mark during the load minus RSS before it; final: the loaded tensors' bytes;")
    print("16-bit: parameters x 2 bytes. On CPU the unquantized tensors (embeddings, head, norms) are float32")
    print("unless the row says bf16.")


if __name__ == "__main__":
    main()
