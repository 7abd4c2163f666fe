"""CPU benchmark: quant vs bitsandbytes 0.50.2 vs dense torch, measured side by side in one run.

    python bench/quant_cpu.py [--size 4096] [--threads N] [--quick] [--only nf4|int8]

For an N x N NF4 weight (blocksize 64), with and without double quantization: quantize,
dequantize, and the 4-bit matmul with 1, 16 and 256 input rows in fp32 and bf16 (fp32 also at
torch's "medium" float32 matmul precision, where we and torch's dense matmul may use bf16
products, as bitsandbytes' CPU kernel always does for fp32 input). Each of our
timings is divided into bitsandbytes' best path for the same case (for matmuls the faster of its
functional matmul_4bit and its Linear4bit eval-mode forward, which runs its fused AVX-512-BF16
gemv for one row) and into a dense torch matmul with the same activations. Ratios > 1 mean we
are faster. Prints a markdown table.

int8 rows (LLM.int8, threshold 6.0, as transformers' load_in_8bit): quantizing the weight (through
float16, as Int8Params does) against bitsandbytes' int8_vectorwise_quant; Linear8bitLt's default
forward ("int8 matmul": int8 weights, float activations, the native weight-only kernel) against
bitsandbytes' Linear8bitLt on its dequantized-weight path (training mode, MatMul8bitFp), and the
opt-in --int8-activations forward ("int8 matmul +acts") against bitsandbytes' eval-mode forward, at
1, 16 and 256 rows in fp32 and bf16. The activations carry two outlier columns (|x| >= 6 in most
rows), as LLMs' hidden states do.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import torch

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bench(fn: Callable[[], object], min_time: float = 0.4, max_reps: int = 200) -> float:
    """Median wall time of fn() in milliseconds, after warm-up."""
    for _ in range(2):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size (default 4096)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    parser.add_argument("--only", choices=["nf4", "int8"], help="only the 4-bit (nf4) or only the int8 rows")
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time = 0.15 if args.quick else 0.5

    import bitsandbytes as bnb

    from quantserve.quant.backends import backend_report

    n = args.size
    torch.manual_seed(0)
    print(f"# quant vs bitsandbytes {bnb.__version__} vs dense torch {torch.__version__}, CPU, "
          f"{torch.get_num_threads()} threads, {n}x{n} weights (NF4 blocksize 64; int8: LLM.int8, threshold 6)")
    for name, status in backend_report().items():
        print(f"# backend {name}: {status}")
    print()
    print("| op | dtype | double quant | rows | ours ms | bnb ms | dense ms | vs bnb | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")

    def row(op, dtype, dq, rows, ours, theirs, dense=None):
        vs_dense = f"{dense / ours:.2f}x" if dense is not None else "-"
        dense_s = f"{dense:.3f}" if dense is not None else "-"
        dq_s = "-" if dq is None else "yes" if dq else "no"
        print(f"| {op} | {str(dtype).removeprefix('torch.')} | {dq_s} | {rows} | "
              f"{ours:.3f} | {theirs:.3f} | {dense_s} | {theirs / ours:.2f}x | {vs_dense} |", flush=True)

    if args.only != "int8":
        nf4_rows(n, min_time, row)
    if args.only != "nf4":
        int8_rows(n, min_time, row)


def nf4_rows(n, min_time, row) -> None:
    import bitsandbytes as bnb

    import quantserve.quant as quant

    for dtype in (torch.float32, torch.bfloat16):
        W = torch.randn(n, n, dtype=dtype) * 0.02
        for dq in (False, True):
            ours_q = bench(lambda: quant.quantize_4bit(W, quant_type="nf4", compress_statistics=dq), min_time)
            theirs_q = bench(lambda: bnb.functional.quantize_4bit(W, quant_type="nf4", compress_statistics=dq), min_time)
            row("quantize", dtype, dq, "-", ours_q, theirs_q)

            packed, state = quant.quantize_4bit(W, quant_type="nf4", compress_statistics=dq)
            b_packed, b_state = bnb.functional.quantize_4bit(W, quant_type="nf4", compress_statistics=dq)
            ours_d = bench(lambda: quant.dequantize_4bit(packed, state), min_time)
            theirs_d = bench(lambda: bnb.functional.dequantize_4bit(b_packed, b_state), min_time)
            row("dequantize", dtype, dq, "-", ours_d, theirs_d)

            linear = torch.nn.Linear(n, n, bias=False, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(W)
            ours_layer = quant.Linear4bit.from_linear(
                linear, quant.QuantConfig(bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=dtype)
            )
            bnb_layer = bnb.nn.Linear4bit(
                n, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=dq
            )
            bnb_layer.load_state_dict(linear.state_dict())
            bnb_layer = bnb_layer.to("cpu").eval()
            W_dense = W.clone()
            for rows in (1, 16, 256):
                x = torch.randn(rows, n, dtype=dtype)
                with torch.inference_mode():
                    ours_m = bench(lambda: ours_layer(x), min_time)
                    theirs_fn = bench(lambda: bnb.matmul_4bit(x, b_packed, quant_state=b_state), min_time)
                    theirs_layer = bench(lambda: bnb_layer(x), min_time)
                    dense = bench(lambda: torch.nn.functional.linear(x, W_dense), min_time)
                row("matmul", dtype, dq, rows, ours_m, min(theirs_fn, theirs_layer), dense)
                if dtype == torch.float32:  # the server's default precision: bf16 products allowed
                    torch.set_float32_matmul_precision("medium")
                    try:
                        with torch.inference_mode():
                            ours_m = bench(lambda: ours_layer(x), min_time)
                            dense = bench(lambda: torch.nn.functional.linear(x, W_dense), min_time)
                    finally:
                        torch.set_float32_matmul_precision("highest")
                    row("matmul", "float32 (medium)", dq, rows, ours_m, min(theirs_fn, theirs_layer), dense)


def int8_rows(n, min_time, row) -> None:
    import bitsandbytes as bnb

    import quantserve.quant as quant

    for dtype in (torch.float32, torch.bfloat16):
        W = torch.randn(n, n, dtype=dtype) * 0.02
        ours_q = bench(lambda: quant.int8_vectorwise_quant(W.to(torch.float16)), min_time)
        theirs_q = bench(lambda: bnb.functional.int8_vectorwise_quant(W.to(torch.float16)), min_time)
        row("int8 quantize", dtype, None, "-", ours_q, theirs_q)
        linear = torch.nn.Linear(n, n, bias=False, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(W)
        ours_layer = quant.Linear8bitLt.from_linear(linear)  # threshold 6.0
        ours_acts = quant.Linear8bitLt.from_linear(linear, quant.QuantConfig(load_in_8bit=True,
                                                                              llm_int8_activations=True))
        bnb_layer = bnb.nn.Linear8bitLt(n, n, bias=False, has_fp16_weights=False, threshold=6.0)
        bnb_layer.load_state_dict(linear.state_dict())
        bnb_layer = bnb_layer.to("cpu").eval()
        W_dense = W.clone()
        for rows in (1, 16, 256):
            x = torch.randn(rows, n, dtype=dtype)
            x[:, 1] *= 12.0  # two outlier features, computed in 16 bits by both
            x[:, n // 2] *= 12.0
            with torch.inference_mode():
                ours_m = bench(lambda: ours_layer(x), min_time)
                ours_a = bench(lambda: ours_acts(x), min_time)
                theirs_a = bench(lambda: bnb_layer.eval()(x), min_time)
                theirs_m = bench(lambda: bnb_layer.train()(x), min_time)  # its dequantized-weight path
                bnb_layer.eval()
                dense = bench(lambda: torch.nn.functional.linear(x, W_dense), min_time)
            row("int8 matmul", dtype, None, rows, ours_m, theirs_m, dense)
            row("int8 matmul +acts", dtype, None, rows, ours_a, theirs_a, dense)


if __name__ == "__main__":
    main()
