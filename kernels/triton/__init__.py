"""Triton kernels for the quant ops and the engine's GPU path (NVIDIA and AMD GPUs, via Triton).

    tiles.py       @triton.jit helpers: absmax (and double-quant) decoding, weight and activation
                   tiles, split-K ranges and epilogue
    dequant.py     dequantize_4bit_kernel
    gemv.py        gemv_4bit_kernel: fused dequant-GEMV for M <= 4 rows, split-K
    gemm.py        gemm_4bit_kernel: fused dequant-GEMM with tl.dot
    int8.py        the LLM.int8 kernels (quant/backends/triton_int8.py)
    attention.py   paged_attention_kernel (+ paged_attention_reduce_kernel for split contexts) and
                   write_kv_kernel, on the engine's KV cache
    lora.py        LoRA shrink / expand for mixed-adapter batches
    configs.py     autotuning configurations per GPU family
    tune_cache.py  the autotuners' choices saved and restored across processes
    ops.py         launchers, and torch.library.triton_op wrappers (torch.ops.quant_triton.*)

Importing this package imports nothing heavy; `from quantserve.kernels.triton import ops` imports triton.
Tests run every kernel on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it before anything
imports triton).
"""
