"""Perplexity of the default model on a fixed public-domain text: quantserve's fp32 / NF4 /
NF4 + double quant / FP4 / int8 (LLM.int8) next to transformers (fp32) and transformers +
bitsandbytes (the same 4-bit settings; load_in_8bit for int8), all on the same tokens.

    python bench/perplexity.py [--model FOLDER_OR_HUB_ID] [--device cpu|cuda] [--settings int8,...]
                               [--lm-heads none,int8,nf4]

--lm-heads: each setting also with its output head quantized as `--quantize-lm-head` makes it
(rows "nf4/head int8" ...); transformers/bitsandbytes have no such head, so those rows leave the
bnb columns empty.

bitsandbytes runs as users get it: in eval mode on a CPU with AVX-512-BF16 its Linear4bit uses a
fused kernel that computes in bf16; the "bnb exact" rows switch that off (dequantize + fp32 matmul),
which is what quantserve computes at the "highest" float32 matmul precision. The "ours, medium"
column is quantserve at torch's "medium" precision (the server's default): bf16 products with
float32 sums in the 4-bit matmuls on AVX-512-BF16 CPUs (and in torch's own float32 matmuls).
int8 (the default forward: int8 weights, float activations, the dequantized-weight matmul) is
compared with "bnb exact" = bitsandbytes' Linear8bitLt on its dequantized-weight path (MatMul8bitFp,
which it takes on CPU in training mode); "int8+acts" is quantserve's --int8-activations (activations
quantized to int8 too, LLM.int8 proper), whose bytes equal the "transformers/bnb" column (bitsandbytes
in eval mode, as users get it).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from quantserve.server.loading.default_text import TEXT  # the text `quantserve verify` reads by default
from quantserve.server.loading.verify import perplexity  # noqa: F401 - the same measure as `quantserve verify`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="folder or Hub id (default: the built-in default model)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--cache-dir", help="quantserve cache ($QUANTSERVE_CACHE)")
    parser.add_argument("--settings", help="comma-separated subset of fp32,nf4,nf4+dq,fp4,int8,int8+acts (default: all)")
    parser.add_argument("--lm-heads", default="none", help="comma-separated output head formats: none,int8,nf4 "
                        "(default: none, the 16-bit head)")
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb
    import transformers as tf

    import quantserve.quant as quant
    from quantserve.server.loading.loader import LoadConfig, load_model
    from quantserve.server.loading.sources import resolve_source
    from quantserve.server.engine.models.quantized_head import HEAD_QUANTIZATIONS

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = {
        "fp32": None,
        "nf4": quant.QuantConfig(),
        "nf4+dq": quant.QuantConfig(bnb_4bit_use_double_quant=True),
        "fp4": quant.QuantConfig(bnb_4bit_quant_type="fp4"),
        "int8": quant.QuantConfig(load_in_8bit=True),
        "int8+acts": quant.QuantConfig(load_in_8bit=True, llm_int8_activations=True),
    }
    if args.settings:
        wanted = [name.strip() for name in args.settings.split(",")]
        unknown = sorted(set(wanted) - set(settings))
        if unknown:
            parser.error(f"unknown settings {unknown}; choose from {sorted(settings)}")
        settings = {name: settings[name] for name in wanted}
    heads = [name.strip() for name in args.lm_heads.split(",") if name.strip()]
    if not heads or set(heads) - set(HEAD_QUANTIZATIONS):
        parser.error(f"--lm-heads takes {', '.join(HEAD_QUANTIZATIONS)}, got {args.lm_heads!r}")
    base = LoadConfig(args.model, device=device, dtype=torch.float32, cache_dir=args.cache_dir, progress=False)
    folder, description = resolve_source(base.model, base.revision, base.cache_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids.to(device)
    print(f"{description}: {ids.shape[1]} tokens of public-domain text, fp32 activations, device {device}")
    print(f"{'setting':<15} {'quantserve':>11} {'ours, medium':>13} {'transformers/bnb':>17} {'bnb exact':>10}"
          "   seconds (ours, bnb)")
    for (name, q), head in [(item, head) for item in settings.items() for head in heads]:
        label = name if head == "none" else f"{name}/head {head}"
        start = time.perf_counter()
        ours = load_model(LoadConfig(args.model, device=device, dtype=torch.float32, quant=q, cache_dir=args.cache_dir,
                                     progress=False, quantize_lm_head=head))
        ppl_ours = perplexity(ours.model, ids)
        seconds_ours = time.perf_counter() - start
        torch.set_float32_matmul_precision("medium")
        try:
            ppl_medium = perplexity(ours.model, ids)
        finally:
            torch.set_float32_matmul_precision("highest")
        del ours
        if head != "none":  # no transformers/bitsandbytes counterpart of a quantized head
            print(f"{label:<15} {ppl_ours:>11.4f} {ppl_medium:>13.4f} {'-':>17} {'-':>10}   {seconds_ours:.1f}, -",
                  flush=True)
            continue
        kwargs = {}
        if q is not None and q.load_in_8bit:
            kwargs["quantization_config"] = tf.BitsAndBytesConfig(load_in_8bit=True)
        elif q is not None:
            kwargs["quantization_config"] = tf.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
                bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=torch.float32,
            )
        start = time.perf_counter()
        device_map = None if device.type == "cpu" else str(device)
        ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device_map, **kwargs).eval()
        ppl_ref = perplexity(ref, ids)
        seconds_ref = time.perf_counter() - start
        exact = ""
        if q is not None and q.load_in_8bit and device.type == "cpu":
            ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
            for module in ref.modules():
                if isinstance(module, bnb.nn.Linear8bitLt):
                    module.train()  # its CPU dequantized-weight path (MatMul8bitFp); a Linear has no dropout
            exact = f"{perplexity(ref, ids):.4f}"
        if q is not None and not q.load_in_8bit and device.type == "cpu":
            ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
            for module in ref.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.support_avx512bf16_for_cpu = False
            exact = f"{perplexity(ref, ids):.4f}"
        del ref
        print(f"{label:<15} {ppl_ours:>11.4f} {ppl_medium:>13.4f} {ppl_ref:>17.4f} {exact:>10}   "
              f"{seconds_ours:.1f}, {seconds_ref:.1f}", flush=True)


if __name__ == "__main__":
    main()
