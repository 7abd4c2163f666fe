"""`quantserve verify`'s figures next to transformers + bitsandbytes on the same text and folder.

    python bench/verify_peers.py [--model FOLDER] [--formats nf4,nf4+dq,fp4,int8] [--json]

For each format: perplexity of the 16-bit and the quantized model, KL(16-bit || quantized) per
token (mean) and top-1 agreement, from quantserve (server/loading/verify.py, the loader's model,
torch's float32 matmul precision "highest") and from transformers + bitsandbytes
(BitsAndBytesConfig(load_in_4bit / load_in_8bit) on the same folder, fp32 compute), whose 16-bit
side is transformers' own fp32 model. bitsandbytes runs as shipped: on a CPU with AVX-512-BF16
its eval-mode 4-bit layers compute in bf16.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
import torch.nn.functional as F


def peer_figures(folder, fmt: str, ids: torch.Tensor, base_logp: torch.Tensor) -> dict:
    import transformers as tf

    if fmt == "int8":
        config = tf.BitsAndBytesConfig(load_in_8bit=True)
    else:
        kind, _, dq = fmt.partition("+")
        config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=bool(dq),
                                       bnb_4bit_compute_dtype=torch.float32)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config).eval()
    with torch.no_grad():
        q = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return {
        "perplexity_quantized": torch.exp(F.nll_loss(q, targets)).item(),
        "kl_divergence": F.kl_div(q, base_logp, log_target=True, reduction="batchmean").item(),
        "top1_agreement": (base_logp.argmax(-1) == q.argmax(-1)).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="folder (default: the built-in default model)")
    parser.add_argument("--formats", default="nf4,nf4+dq,fp4,int8")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import transformers as tf

    from quantserve.server.loading.default_text import TEXT
    from quantserve.server.loading.loader import LoadConfig
    from quantserve.server.loading.sources import resolve_source
    from quantserve.server.loading.verify import VerifyRequest, verify

    torch.set_float32_matmul_precision("highest")
    formats = tuple(f.strip() for f in args.formats.split(","))
    start = time.perf_counter()
    ours = verify(VerifyRequest(model=args.model, formats=formats, progress=False))
    seconds_ours = time.perf_counter() - start
    base = LoadConfig(args.model, progress=False)
    folder, _ = resolve_source(base.model, base.revision, base.cache_dir)
    ids = tf.AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt").input_ids
    start = time.perf_counter()
    reference = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logp = F.log_softmax(reference(ids).logits[0, :-1].float(), -1)
    peer = {"perplexity_16bit": torch.exp(F.nll_loss(base_logp, ids[0, 1:])).item(), "formats": {}}
    del reference
    for fmt in formats:
        peer["formats"][fmt] = peer_figures(folder, fmt, ids, base_logp)
    seconds_peer = time.perf_counter() - start
    if args.json:
        print(json.dumps({"quantserve": ours, "transformers_bitsandbytes": peer}, indent=2))
        return
    print(f"{ours['model']}: {ours['text']['tokens']} tokens of the built-in text; quantserve {seconds_ours:.0f} s, "
          f"transformers + bitsandbytes {seconds_peer:.0f} s")
    print(f"16-bit perplexity: quantserve {ours['perplexity_16bit']:.4f}, transformers {peer['perplexity_16bit']:.4f}")
    print("| format | perplexity (ours / t+bnb) | KL divergence (ours / t+bnb) | top-1 agreement (ours / t+bnb) |")
    print("|---|---|---|---|")
    for fmt in formats:
        o, p = ours["formats"][fmt], peer["formats"][fmt]
        print(f"| {fmt} | {o['perplexity_quantized']:.4f} / {p['perplexity_quantized']:.4f} | "
              f"{o['kl_divergence']:.4f} / {p['kl_divergence']:.4f} | "
              f"{o['top1_agreement']:.2%} / {p['top1_agreement']:.2%} |")


if __name__ == "__main__":
    main()
