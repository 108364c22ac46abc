"""Triton kernels (GPU; testable on CPU with TRITON_INTERPRET=1)."""
