"""RankSim: ranking similarity regularisation (Gong et al., ICML 2022).

RankSim asks the ranking of a sample's neighbours in feature space to match their ranking in label
space. With one kept sample per distinct batch label (see below), S = cosine similarity matrix of
the kept features, T_ij = -|y_i - y_j| and rk(.) the normalised descending rank of a row
(the most similar gets 1/n, the least similar n/n):

    L = sum_i  1/n sum_j ( rk(S_i)_j - rk(T_i)_j )^2

The rank is piecewise constant, so its gradient comes from blackbox differentiation (Vlastelica
et al., ICLR 2020): the backward pass re-ranks the input perturbed by lambda * (incoming gradient)
and returns -(rk(s) - rk(s')) / lambda, with lambda the interpolation strength.

Follows BorealisAI/ranksim-imbalanced-regression (agedb-dir/ranksim.py, ranking.py): the same rank
convention, the sum over rows of the per-row MSE, the subset with one random sample per label
(skipped when all labels are distinct), the +1e-8 next to lambda. It differs in:
- all rows at once: ranks are row-wise, so one (n, n) argsort replaces the per-row loop;
- the subset comes from one permutation drawn from `generator` (the first occurrence of each label
  in it), not from Python's global `random`; each label still gets a uniformly chosen sample;
- ranks are in the features' dtype (at least float32), not always float32;
- ties are broken stably (by index), where the original leaves it to the backend's sort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ranksim_loss(features: torch.Tensor, labels: torch.Tensor, interpolation: float = 2.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Scalar RankSim regulariser of features (B, D) given labels (B,); the original's gamma
    (the weight of this term in the total loss) is left to the caller."""
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"expected features of shape (B, D) and labels of shape (B,), got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    if not interpolation > 0:
        raise ValueError(f"interpolation={interpolation} must be > 0")
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()  # ranks k/n and the cosine matrix need more than 8 bits
    keep = one_sample_per_label(labels, generator)
    if keep is not None:
        features, labels = features[keep], labels[keep]
    unit = F.normalize(features, dim=1)
    feature_similarity = unit @ unit.T
    label_similarity = -(labels[:, None] - labels[None, :]).abs()
    feature_ranks = BlackboxRank.apply(feature_similarity, interpolation)
    label_ranks = rank_normalised(label_similarity).to(feature_ranks.dtype)
    # Per-row mean, summed over rows: the original's loop of F.mse_loss calls.
    return (feature_ranks - label_ranks).pow(2).mean(dim=1).sum()


def one_sample_per_label(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Indices of one uniformly random sample per distinct label, in increasing label order (as the
    original's torch.unique loop); None when the labels are already distinct.

    The first occurrence of each label in a uniformly random permutation is a uniform pick among
    that label's samples, so one permutation drawn on the CPU from `generator` replaces the loop.
    """
    distinct, inverse = torch.unique(labels, return_inverse=True)
    if len(distinct) == len(labels):
        return None
    permutation = torch.randperm(len(labels), generator=generator).to(labels.device)
    position = torch.empty_like(permutation)
    position[permutation] = torch.arange(len(labels), device=labels.device)  # where each sample landed
    first = torch.full((len(distinct),), len(labels), dtype=position.dtype, device=labels.device)
    first = first.scatter_reduce(0, inverse, position, reduce="amin")
    return permutation[first]


def rank_normalised(rows: torch.Tensor) -> torch.Tensor:
    """(rank + 1) / n per row, rank 0 for the largest entry: the original's
    argsort(argsort(x).flip(1)), with a stable sort so that ties are deterministic."""
    descending = torch.argsort(rows, dim=1, stable=True).flip(1)
    rank = torch.argsort(descending, dim=1, stable=True)
    dtype = torch.promote_types(rows.dtype, torch.float32) if rows.is_floating_point() else torch.float32
    return (rank + 1).to(dtype) / rows.shape[1]


class BlackboxRank(torch.autograd.Function):
    """Row-wise normalised rank with the blackbox-differentiation gradient (the original TrueRanker)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, interpolation: float) -> torch.Tensor:
        ranks = rank_normalised(rows)
        ctx.interpolation = interpolation
        ctx.save_for_backward(rows, ranks)
        return ranks

    @staticmethod
    def backward(ctx, grad_ranks: torch.Tensor) -> tuple[torch.Tensor, None]:
        rows, ranks = ctx.saved_tensors
        perturbed_ranks = rank_normalised(rows + ctx.interpolation * grad_ranks)
        # The original's +1e-8 is kept so that the two agree to the last bit.
        return -(ranks - perturbed_ranks) / (ctx.interpolation + 1e-8), None
