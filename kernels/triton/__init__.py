"""Triton kernels for the 4-bit ops and paged-attention decode (NVIDIA and AMD GPUs, via Triton).

    tiles.py      @triton.jit helpers: absmax (and double-quant) decoding, weight tiles, split-K epilogue
    dequant.py    dequantize_4bit_kernel
    gemv.py       gemv_4bit_kernel: fused dequant-GEMV for M <= 4 rows, split-K
    gemm.py       gemm_4bit_kernel: fused dequant-GEMM with tl.dot
    attention.py  paged_attention_decode_kernel (+ reduce for split contexts)
    configs.py    autotuning configurations per GPU family
    ops.py        launchers, and torch.library.triton_op wrappers (torch.ops.quant_triton.*)

Importing this package imports nothing heavy; `from quantserve.kernels.triton import ops` imports triton.
Tests run every kernel on CPU under TRITON_INTERPRET=1 (set before importing ops).
"""
