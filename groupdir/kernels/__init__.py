"""The contrastive loss's fused Triton kernels (contrastive.py: import it only where Triton runs, on
CUDA or on the CPU with TRITON_INTERPRET=1 set before the import), their analytic FLOP counts
(flops.py) and their check against the naive reference (check.py); these two import anywhere."""
