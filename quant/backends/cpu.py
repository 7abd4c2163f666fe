"""CPU backend placeholder: filled in with native kernels."""
