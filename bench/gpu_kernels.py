"""GPU kernel benchmark: our 4-bit matmul vs bitsandbytes' CUDA path vs cuBLAS dense, one run.

    python bench/gpu_kernels.py [--rows 1 4 16 64 256] [--dtype bfloat16] [--quant-type nf4]
                            [--absmax both|fp32|double] [--replays 30] [--no-graph] [--out FILE]

For the Llama-3-8B layer shapes (in_features K -> out_features N: q/o_proj 4096 -> 4096, k/v_proj
4096 -> 1024, gate/up_proj 4096 -> 14336, down_proj 14336 -> 4096) and M activation rows, prints
markdown tables with, per case: our time (the quant op as dispatched: the CUDA C++ GEMV for M = 1
when it builds, the Triton GEMV / tl.dot GEMM, or dequantize + cuBLAS for large M), the bytes it
must move as achieved GB/s and as % of this GPU's measured device-to-device copy bandwidth, the
speedup over bitsandbytes' best path (the faster of its matmul_4bit and its dequantize + F.linear)
and over cuBLAS bf16 dense (F.linear), each component path on its own, and the issue's targets
(M=1: >= 80% of copy bandwidth and >= 1.3x bitsandbytes; M=16: >= 2.5x dense; M=256: >= 0.9x dense).

Method. Each timing replays a CUDA graph that calls the kernel on R rotating copies of the weight
(R * weight bytes >= 3x the L2 cache), so weights stream from DRAM as in a real forward pass and
launch overhead is excluded as in the engine's graph-captured decode; time per call = replay
time / R, median over replays. Both libraries quantize the same random weights (blocksize 64);
ours reads bitsandbytes' bytes and state. A path that cannot be graph-captured is timed in an
eager loop and marked with *. Autotuning runs during the warm-up, before capture.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from typing import Callable

import torch

DEVICE = "cuda"
SHAPES = [  # (layer, K in_features, N out_features)
    ("q_proj/o_proj", 4096, 4096),
    ("k_proj/v_proj", 4096, 1024),
    ("gate_proj/up_proj", 4096, 14336),
    ("down_proj", 14336, 4096),
]
BLOCKSIZE = 64


def copy_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written, per second)."""
    free = torch.cuda.mem_get_info()[0]
    nbytes = min(nbytes, free // 4)
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def time_calls(calls: list[Callable[[], object]], replays: int, use_graph: bool) -> tuple[float, bool]:
    """(microseconds per call, timed in a CUDA graph) for the list of calls run back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning, extension builds, cached tables
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for call in calls:
                    call()
        except Exception:  # noqa: BLE001 - not capturable: time it eagerly below
            torch.cuda.synchronize()
        else:
            graph.replay()
            times = []
            for _ in range(replays):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times) * 1e3 / len(calls), True
    times = []
    for _ in range(replays):
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3 / len(calls), False


@dataclasses.dataclass
class Row:
    layer: str
    K: int
    N: int
    M: int
    ours_us: float
    ours_graph: bool
    ours_bytes: int
    bnb_us: float
    bnb_path: str
    bnb_graph: bool
    dense_us: float
    parts: dict[str, tuple[float, bool]]


def _fmt(us: float, graphed: bool = True) -> str:
    return f"{us:.1f}" + ("" if graphed else "*")


def bench_case(layer, K, N, M, args, l2_bytes) -> Row:
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    import quantserve.quant as quant
    from quantserve.kernels.triton import ops as kt
    from quantserve.quant.backends import cuda as native
    from quantserve.quant.backends.triton import _code

    dtype = getattr(torch, args.dtype)
    nested = args.absmax_mode == "double"
    qt = args.quant_type
    packed_bytes = N * K // 2
    blocks = math.ceil(N * K / BLOCKSIZE)
    absmax_bytes = blocks + 4 * math.ceil(blocks / 256) if nested else 4 * blocks
    weight_bytes = packed_bytes + absmax_bytes
    copies = max(2, min(64, math.ceil(3 * l2_bytes / weight_bytes)))
    dense_copies = max(2, math.ceil(3 * l2_bytes / (2 * N * K)))

    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    code = _code(qt, x.device)
    layers = []
    for _ in range(copies):
        W = torch.randn(N, K, device=DEVICE, dtype=dtype)
        packed, bstate = BF.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=qt, compress_statistics=nested)
        state = quant.QuantState.from_dict(bstate.as_dict(packed=True), device=DEVICE)
        layers.append((packed, bstate, state))
    del W
    dense = [torch.randn(N, K, device=DEVICE, dtype=dtype) for _ in range(dense_copies)]

    def ours(packed, state):
        if state.nested is not None:
            n = state.nested
            return lambda: torch.ops.quant.gemm_4bit_nested(x, packed, [N, K], state.absmax, n.absmax, n.code,
                                                            n.offset, BLOCKSIZE, n.blocksize, qt, None)
        return lambda: torch.ops.quant.gemm_4bit(x, packed, [N, K], state.absmax, BLOCKSIZE, qt, None)

    def nested_args(state):
        n = state.nested
        return None if n is None else kt.Nested(n.absmax, n.code, n.offset, n.blocksize)

    def triton_fused(packed, state):
        return lambda: kt.gemm_4bit(x, packed.view(-1), N, K, code, state.absmax, BLOCKSIZE, None, nested_args(state))

    def cuda_gemv(packed, state):
        n = state.nested
        extra = None if n is None else (n.absmax, n.code, n.offset, n.blocksize)
        return lambda: native.gemv_4bit(x, packed.view(-1), N, K, code, state.absmax, BLOCKSIZE, None, extra)

    def dequant_cublas(packed, state):
        return lambda: torch.nn.functional.linear(
            x, kt.dequantize_4bit(packed.view(-1), N * K, code, state.absmax, BLOCKSIZE, dtype,
                                  nested_args(state)).view(N, K))

    def bnb_matmul(packed, bstate):
        return lambda: bnb.matmul_4bit(x, packed.t(), quant_state=bstate)

    def bnb_dequant(packed, bstate):
        return lambda: torch.nn.functional.linear(x, BF.dequantize_4bit(packed, bstate).to(dtype))

    graph = not args.no_graph
    with torch.inference_mode():
        ours_us, ours_graph = time_calls([ours(p, s) for p, _, s in layers], args.replays, graph)
        bnb_times = {
            "matmul_4bit": time_calls([bnb_matmul(p, b) for p, b, _ in layers], args.replays, graph),
            "dequant+linear": time_calls([bnb_dequant(p, b) for p, b, _ in layers], args.replays, graph),
        }
        bnb_path = min(bnb_times, key=lambda k: bnb_times[k][0])
        dense_us, _ = time_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in dense], args.replays, graph)
        parts: dict[str, tuple[float, bool]] = {}
        if kt.matmul_supported(N, K, BLOCKSIZE):
            parts["triton fused"] = time_calls([triton_fused(p, s) for p, _, s in layers], args.replays, graph)
        if M == 1 and cuda_gemv(layers[0][0], layers[0][2])() is not None:  # None: not built / unsupported
            parts["CUDA C++"] = time_calls([cuda_gemv(p, s) for p, _, s in layers], args.replays, graph)
        if M >= 16:
            parts["dequant+cuBLAS"] = time_calls([dequant_cublas(p, s) for p, _, s in layers], args.replays, graph)
    ours_bytes = weight_bytes + x.numel() * x.element_size() + M * N * x.element_size()
    return Row(layer, K, N, M, ours_us, ours_graph, ours_bytes, bnb_times[bnb_path][0], bnb_path,
               bnb_times[bnb_path][1], dense_us, parts)


def targets(row: Row, pct_bw: float) -> str:
    vs_bnb, vs_dense = row.bnb_us / row.ours_us, row.dense_us / row.ours_us
    if row.M == 1:
        ok = pct_bw >= 80 and vs_bnb >= 1.3
        return ("ok" if ok else "MISS") + " (>=80% BW, >=1.3x bnb)"
    if row.M == 16:
        return ("ok" if vs_dense >= 2.5 else "MISS") + " (>=2.5x dense)"
    if row.M == 256:
        return ("ok" if vs_dense >= 0.9 else "MISS") + " (>=0.9x dense)"
    return ""


def print_table(rows: list[Row], copy_gbs: float, title: str, out) -> None:
    print(f"\n### {title}\n", file=out)
    print("| layer | K -> N | M | ours us | GB/s | % copy BW | bnb best us (path) | x bnb | dense us | x dense "
          "| triton fused us | CUDA C++ us | dequant+cuBLAS us | target |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        gbs = r.ours_bytes / (r.ours_us * 1e-6) / 1e9
        pct = 100 * gbs / copy_gbs
        part = {k: _fmt(*v) for k, v in r.parts.items()}
        print(f"| {r.layer} | {r.K} -> {r.N} | {r.M} | {_fmt(r.ours_us, r.ours_graph)} | {gbs:.0f} | {pct:.0f}% "
              f"| {_fmt(r.bnb_us, r.bnb_graph)} ({r.bnb_path}) | {r.bnb_us / r.ours_us:.2f} | {r.dense_us:.1f} "
              f"| {r.dense_us / r.ours_us:.2f} | {part.get('triton fused', '-')} | {part.get('CUDA C++', '-')} "
              f"| {part.get('dequant+cuBLAS', '-')} | {targets(r, pct)} |", file=out)
    for M in sorted({r.M for r in rows}):
        sel = [r for r in rows if r.M == M]
        gm_bnb = math.exp(statistics.fmean(math.log(r.bnb_us / r.ours_us) for r in sel))
        gm_dense = math.exp(statistics.fmean(math.log(r.dense_us / r.ours_us) for r in sel))
        print(f"\nM={M}: geometric mean speedup {gm_bnb:.2f}x vs bitsandbytes, {gm_dense:.2f}x vs dense", file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--absmax", default="both", choices=["both", "fp32", "double"],
                        help="absmax stored as float32, double-quantized (8-bit), or a table for each")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--no-graph", action="store_true", help="time eager loops instead of CUDA graphs")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py needs a CUDA or ROCm GPU")

    import bitsandbytes as bnb
    import triton

    from quantserve.quant.backends import cuda as native
    from quantserve.quant.backends import triton as backend

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    copy_gbs = copy_bandwidth_gbs()
    outputs = [sys.stdout] + ([open(args.out, "w")] if args.out else [])
    header = [
        f"# 4-bit matmul on {props.name} ({props.multi_processor_count} SMs, L2 {l2_bytes >> 20} MiB)",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, HIP {torch.version.hip}), triton {triton.__version__}, "
        f"bitsandbytes {bnb.__version__}, {args.quant_type} blocksize {BLOCKSIZE}, activations {args.dtype}",
        f"measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)",
        f"backend: {backend.status()}",
    ]
    for out in outputs:
        print("\n".join(header), file=out)
    modes = ["fp32", "double"] if args.absmax == "both" else [args.absmax]
    for mode in modes:
        args.absmax_mode = mode
        rows = []
        for layer, K, N in SHAPES:
            for M in args.rows:
                rows.append(bench_case(layer, K, N, M, args, l2_bytes))
                print(f"  done {layer} M={M} ({mode} absmax)", file=sys.stderr)
                torch.cuda.empty_cache()
        title = f"absmax {'float32 (4.5 bits/param)' if mode == 'fp32' else 'double-quantized (4.13 bits/param)'}"
        for out in outputs:
            print_table(rows, copy_gbs, title, out)
    for out in outputs:
        print(f"\n`*` = not graph-capturable, timed in an eager loop (includes launch overhead). "
              f"CUDA C++ GEMV: {native.status()}", file=out)
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":
    main()
