"""Analytic matmul FLOPs of the contrastive loss, forward and backward, per implementation: what
`groupdir bench loss` prints beside the times, so the work of each path shows on any machine.
Plain Python, no Triton: the CPU bench imports it."""

from __future__ import annotations

OLD_FEATURE_CHUNK = 32  # the feature chunk of the backward before issue 13, see matmul_flops


def histogram_width(num_groups: int) -> int:
    """Columns of the forward kernel's per-group accumulator: a power of two (tl.arange) of at least
    16 (tl.dot's smallest tile)."""
    return max(16, 1 << (num_groups - 1).bit_length())


def matmul_flops(batch: int, dim: int, num_groups: int) -> dict[str, tuple[int, int]]:
    """(forward, backward) matmul FLOPs, 2 per multiply-add, of one loss on a (B, D) batch in G groups.

    Tiles cover the whole B x B square, as computed (diagonal and both triangles); the padding of B
    to the block size is ignored, and so is elementwise work: exp, the O(B G) tail, and the naive
    loss's B x B x B mask, which is what makes it slow (its matmuls are the torch path's).
    """
    pairs = batch * batch
    similarity = 2 * pairs * dim  # S = Z Z^T
    gradient = 2 * pairs * dim    # dS Z: one side of dZ
    histogram = 2 * pairs * histogram_width(num_groups)  # exp tile @ one-hot column groups
    chunks = -(-dim // OLD_FEATURE_CHUNK)
    autograd = (similarity, 2 * gradient)  # autograd of Z Z^T: dS Z + dS^T Z
    return {
        "floor": autograd,
        "naive": autograd,
        "torch": autograd,
        # Backward: the similarity tile once, then (G + G^T) Z once (both sides in one product).
        "triton": (similarity + histogram, similarity + gradient),
        # Before issue 13: per side, the tile rebuilt for every 32-wide feature chunk, then G Z.
        "triton, old backward": (similarity + histogram, 2 * (chunks * similarity + gradient)),
    }
