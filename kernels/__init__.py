"""Kernel sources of quantserve: cpu/ holds the native C++ kernels behind quant/backends/cpu.py."""
