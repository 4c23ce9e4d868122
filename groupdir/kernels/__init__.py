"""Fused Triton kernels. Import this only where Triton runs: on CUDA, or on the CPU with
TRITON_INTERPRET=1 set before the import."""
