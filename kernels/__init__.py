"""All of quantserve's native code, installed as quantserve.kernels.

    cpu/          C++ kernels built on first use (build.py): 4-bit and int8 quantize/dequantize/GEMM
                  (behind quant/backends/cpu.py, cpu_int8.py) and the engine's CPU kernels (paged
                  attention, the fused decoder step, LoRA, the output heads)
    cuda/         CUDA/HIP C++ batch-1 GEMV (behind quant/backends/cuda.py)
    triton/       Triton kernels: 4-bit and int8 matmuls (behind quant/backends/triton*.py) and the
                  engine's GPU paged attention and LoRA
    cache.py      where built libraries go (the one reader of QUANTSERVE_CACHE)
"""
