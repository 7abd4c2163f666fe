"""Perplexity of the default model on a fixed public-domain text: quantserve's fp32 / NF4 /
NF4 + double quant / FP4 / int8 (LLM.int8) next to transformers (fp32) and transformers +
bitsandbytes (the same 4-bit settings; load_in_8bit for int8), all on the same tokens.

    python bench/perplexity.py [--model FOLDER_OR_HUB_ID] [--device cpu|cuda] [--settings int8,...]

bitsandbytes runs as users get it: in eval mode on a CPU with AVX-512-BF16 its Linear4bit uses a
fused kernel that computes in bf16; the "bnb exact" rows switch that off (dequantize + fp32 matmul),
which is what quantserve computes at the "highest" float32 matmul precision. The "ours, medium"
column is quantserve at torch's "medium" precision (the server's default): bf16 products with
float32 sums in the 4-bit matmuls on AVX-512-BF16 CPUs (and in torch's own float32 matmuls).
int8 computes the same bytes as bitsandbytes' Linear8bitLt whatever the precision (integer sums;
the outlier columns in float32), so it has no separate "exact" row.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch

# Public domain: the Gettysburg Address (1863), the opening of the Declaration of Independence
# (1776), and the opening paragraphs of A Tale of Two Cities (1859) and Pride and Prejudice (1813).
TEXT = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty, \
and dedicated to the proposition that all men are created equal.

Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so dedicated, \
can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that field, \
as a final resting place for those who here gave their lives that that nation might live. It is altogether fitting \
and proper that we should do this.

But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. The brave \
men, living and dead, who struggled here, have consecrated it, far above our poor power to add or detract. The world \
will little note, nor long remember what we say here, but it can never forget what they did here. It is for us the \
living, rather, to be dedicated here to the unfinished work which they who fought here have thus far so nobly \
advanced. It is rather for us to be here dedicated to the great task remaining before us -- that from these honored \
dead we take increased devotion to that cause for which they gave the last full measure of devotion -- that we here \
highly resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new birth \
of freedom -- and that government of the people, by the people, for the people, shall not perish from the earth.

When in the Course of human events, it becomes necessary for one people to dissolve the political bands which have \
connected them with another, and to assume among the powers of the earth, the separate and equal station to which \
the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind requires that they \
should declare the causes which impel them to the separation.

We hold these truths to be self-evident, that all men are created equal, that they are endowed by their Creator \
with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure \
these rights, Governments are instituted among Men, deriving their just powers from the consent of the governed, \
That whenever any Form of Government becomes destructive of these ends, it is the Right of the People to alter or \
to abolish it, and to institute new Government, laying its foundation on such principles and organizing its powers \
in such form, as to them shall seem most likely to effect their Safety and Happiness. Prudence, indeed, will \
dictate that Governments long established should not be changed for light and transient causes; and accordingly \
all experience hath shewn, that mankind are more disposed to suffer, while evils are sufferable, than to right \
themselves by abolishing the forms to which they are accustomed. But when a long train of abuses and usurpations, \
pursuing invariably the same Object evinces a design to reduce them under absolute Despotism, it is their right, \
it is their duty, to throw off such Government, and to provide new Guards for their future security.

It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it \
was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of \
Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing \
before us, we were all going direct to Heaven, we were all going direct the other way -- in short, the period was \
so far like the present period, that some of its noisiest authorities insisted on its being received, for good or \
for evil, in the superlative degree of comparison only.

There were a king with a large jaw and a queen with a plain face, on the throne of England; there were a king with \
a large jaw and a queen with a fair face, on the throne of France. In both countries it was clearer than crystal to \
the lords of the State preserves of loaves and fishes, that things in general were settled for ever.

It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a \
wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth \
is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one \
or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.
"""


def perplexity(model, ids: torch.Tensor, window: int = 2048) -> float:
    """exp(mean negative log-likelihood of each next token), non-overlapping windows."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start : start + window + 1]
            logits = model(chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            nll += loss.item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="folder or Hub id (default: the built-in default model)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--cache-dir", help="quantserve cache ($QUANTSERVE_CACHE)")
    parser.add_argument("--settings", help="comma-separated subset of fp32,nf4,nf4+dq,fp4,int8 (default: all)")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb
    import transformers as tf

    import quantserve.quant as quant
    from quantserve.server.loading.loader import LoadConfig, load_model
    from quantserve.server.loading.sources import resolve_source

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = {
        "fp32": None,
        "nf4": quant.QuantConfig(),
        "nf4+dq": quant.QuantConfig(bnb_4bit_use_double_quant=True),
        "fp4": quant.QuantConfig(bnb_4bit_quant_type="fp4"),
        "int8": quant.QuantConfig(load_in_8bit=True),
    }
    if args.settings:
        wanted = [name.strip() for name in args.settings.split(",")]
        unknown = sorted(set(wanted) - set(settings))
        if unknown:
            parser.error(f"unknown settings {unknown}; choose from {sorted(settings)}")
        settings = {name: settings[name] for name in wanted}
    base = LoadConfig(args.model, device=device, dtype=torch.float32, cache_dir=args.cache_dir, progress=False)
    folder, description = resolve_source(base.model, base.revision, base.cache_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids.to(device)
    print(f"{description}: {ids.shape[1]} tokens of public-domain text, fp32 activations, device {device}")
    print(f"{'setting':<8} {'quantserve':>11} {'ours, medium':>13} {'transformers/bnb':>17} {'bnb exact':>10}"
          "   seconds (ours, bnb)")
    for name, q in settings.items():
        start = time.perf_counter()
        ours = load_model(LoadConfig(args.model, device=device, dtype=torch.float32, quant=q, cache_dir=args.cache_dir, progress=False))
        ppl_ours = perplexity(ours.model, ids)
        seconds_ours = time.perf_counter() - start
        torch.set_float32_matmul_precision("medium")
        try:
            ppl_medium = perplexity(ours.model, ids)
        finally:
            torch.set_float32_matmul_precision("highest")
        del ours
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
        if q is not None and not q.load_in_8bit and device.type == "cpu":
            ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
            for module in ref.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.support_avx512bf16_for_cpu = False
            exact = f"{perplexity(ref, ids):.4f}"
        del ref
        print(f"{name:<8} {ppl_ours:>11.4f} {ppl_medium:>13.4f} {ppl_ref:>17.4f} {exact:>10}   "
              f"{seconds_ours:.1f}, {seconds_ref:.1f}", flush=True)


if __name__ == "__main__":
    main()
