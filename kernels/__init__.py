"""All of quantserve's native code, installed as quantserve.kernels.

    cpu/          C++ kernels built on first use: 4-bit quantize/dequantize/GEMM (behind
                  quant/backends/cpu.py) and the engine's paged attention (paged_attention.py)
    cuda/         CUDA/HIP C++ batch-1 GEMV (behind quant/backends/cuda.py)
    triton/       Triton kernels: 4-bit dequantize/GEMV/GEMM and paged-attention decode
    attention.py  the paged-attention decode op (torch.ops.quantserve.*): contract, reference, GPU kernel
    cache.py      where built libraries go (the one reader of QUANTSERVE_CACHE)
"""
