"""Ordinal group-aware contrastive loss, paper Eq. 2.

For anchor i and positive j != i, the denominator sums exp(sim_ik / t) over every k != i whose group
distance to i is at least that of j. The denominator depends on j only through d_ij = |g_i - g_j|,
so per anchor we need a histogram H_i[d] of exp-similarities by group distance and its suffix sums
S_i[d] = sum_{d' >= d} H_i[d']; then (DESIGN.md)

    L = -1/(B(B-1)) * ( sum_{i != j} s_ij / t  -  sum_i sum_d N_i[d] log S_i[d] )

with N_i[d] the number of j != i at distance d. That is O(B^2) time and memory instead of the
O(B^3) mask of the reference code; autograd differentiates it as written.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from groupdir.config import BACKENDS, PRECISIONS, SIMILARITIES


def group_contrastive_loss(z: torch.Tensor, groups: torch.Tensor, temperature: float = 2.5,
                           similarity: str = "cosine", backend: str = "auto", precision: str = "ieee",
                           num_groups: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Scalar mean over the B(B-1) ordered pairs of Eq. 2; z (B, D) is L2-normalised here unless
    `normalize` is false (Rank-N-Contrast's -L2 on raw features; torch and naive backends only).

    For the Triton backend only (torch and naive ignore both):
    - `precision`: how the kernels feed their feature matmuls, accumulating in float32: ieee
      (float32), tf32, or bf16 (inputs rounded to bfloat16). The torch backend's matmuls follow
      torch's own setting (torch.backends.cuda.matmul.allow_tf32), so that `auto` runs anywhere
      with whatever the config says.
    - `num_groups`: the groups span at most num_groups consecutive indices, as 0..num_groups-1 do
      (checked). It sizes the kernels' per-group tables; without it they are sized from the data, a
      shape that torch.compile cannot know: a graph break at the loss unless fullgraph=True.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}: use one of {', '.join(SIMILARITIES)}")
    if z.dim() != 2 or groups.shape != (z.shape[0],):
        raise ValueError(f"expected z of shape (B, D) and groups of shape (B,), got {tuple(z.shape)} "
                         f"and {tuple(groups.shape)}")
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"groups must hold integer group indices, got dtype {groups.dtype}")
    if z.shape[0] < 2:
        raise ValueError("the contrastive loss needs a batch of at least 2 samples")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()  # accumulate in float32
    if not normalize and backend == "triton":
        raise ValueError("the Triton kernels take L2-normalised features: use backend torch (or auto) with normalize=False")
    if backend == "triton" or (backend == "auto" and normalize and z.is_cuda and triton_available()):
        # Triton's own switch: its interpreter runs the kernels on CPU tensors (for tests).
        if not z.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before the "
                             "import, to interpret the kernels on the CPU)")
        from groupdir.kernels.contrastive import group_contrast

        loss, _, _ = group_contrast(F.normalize(z, dim=1), groups - groups.min(), num_groups, temperature,
                                    similarity == "euclidean", precision)
        return loss
    logits = pairwise_similarity(z, similarity, normalize) / temperature
    groups = groups.long()
    distance = (groups[:, None] - groups[None, :]).abs()
    if backend == "naive":
        return _naive(logits, distance)
    return _histogram(logits, distance)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def pairwise_similarity(z: torch.Tensor, similarity: str, normalize: bool = True) -> torch.Tensor:
    """(B, B) similarity of the rows: cosine, or minus the euclidean distance of the L2-normalised
    rows (of the raw rows when `normalize` is false)."""
    unit = F.normalize(z, dim=1)
    if similarity == "cosine":
        return unit @ unit.T
    # Raw rows are centred first: distances do not change, and |a|^2 + |b|^2 - 2 a.b below then
    # cancels far less in float32 when the features' norms are large against their distances.
    rows = unit if normalize else z - z.mean(0, keepdim=True).detach()
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b. Clamping keeps sqrt's gradient finite for identical rows;
    # the diagonal (always excluded from the loss) is set to 1 for the same reason.
    norms = (rows * rows).sum(1)
    squared = (norms[:, None] + norms[None, :] - 2 * rows @ rows.T).clamp_min(1e-12)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    return -torch.where(eye, torch.ones_like(squared), squared).sqrt()


def _histogram(logits: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    batch = len(logits)
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=logits.device)
    # Row max over k != i keeps exp() in range; it cancels between numerator and denominator.
    row_max = logits.masked_fill(~off_diagonal, float("-inf")).amax(dim=1, keepdim=True).detach()
    shifted = logits - row_max
    exp = shifted.exp() * off_diagonal
    num_distances = int(distance.max()) + 1
    hist = logits.new_zeros(batch, num_distances).scatter_add(1, distance, exp)
    count = logits.new_zeros(batch, num_distances).scatter_add(1, distance, off_diagonal.to(logits.dtype))
    suffix = hist.flip(1).cumsum(1).flip(1)
    tiny = torch.finfo(logits.dtype).tiny
    log_suffix = torch.where(count > 0, suffix.clamp_min(tiny).log(), torch.zeros_like(suffix))
    numerator = (shifted * off_diagonal).sum()
    return -(numerator - (count * log_suffix).sum()) / (batch * (batch - 1))


def _naive(logits: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Eq. 2 as written, with the (B, B, B) indicator phi(i, j, k); the test oracle."""
    batch = len(logits)
    eye = torch.eye(batch, dtype=torch.bool, device=logits.device)
    # phi[i, j, k] = k != i and d(i, k) >= d(i, j)
    phi = (distance[:, None, :] >= distance[:, :, None]) & ~eye[:, None, :]
    denominator = torch.logsumexp(logits[:, None, :].masked_fill(~phi, float("-inf")), dim=2)
    log_ratio = (logits - denominator).masked_fill(eye, 0.0)
    return -log_ratio.sum() / (batch * (batch - 1))
