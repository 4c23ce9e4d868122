from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from groupdir.losses.ranksim import one_sample_per_label, rank_normalised, ranksim_loss


# --- The reference code (BorealisAI/ranksim-imbalanced-regression, agedb-dir/ranking.py and ranksim.py),
# transcribed line by line. Two changes only: `.float()` becomes `.double()` so that the comparison can
# be tight at float64, and the random.choice subset is replaced by given indices (the same subset).

def original_rank(seq):
    return torch.argsort(torch.argsort(seq).flip(1))


def original_rank_normalised(seq):
    return (original_rank(seq) + 1).double() / seq.size()[1]


class OriginalTrueRanker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sequence, lambda_val):
        rank = original_rank_normalised(sequence)
        ctx.lambda_val = lambda_val
        ctx.save_for_backward(sequence, rank)
        return rank

    @staticmethod
    def backward(ctx, grad_output):
        sequence, rank = ctx.saved_tensors
        assert grad_output.shape == rank.shape
        sequence_prime = sequence + ctx.lambda_val * grad_output
        rank_prime = original_rank_normalised(sequence_prime)
        gradient = -(rank - rank_prime) / (ctx.lambda_val + 1e-8)
        return gradient, None


def original_batchwise_ranking_regularizer(features, targets, lambda_val, sampled_indices=None):
    loss = 0
    if sampled_indices is not None:
        x = features[sampled_indices]
        y = targets[sampled_indices]
    else:
        x = features
        y = targets
    xxt = torch.matmul(F.normalize(x.view(x.size(0), -1)), F.normalize(x.view(x.size(0), -1)).permute(1, 0))
    for i in range(len(y)):
        label_ranks = original_rank_normalised(-torch.abs(y[i] - y).transpose(0, 1))
        feature_ranks = OriginalTrueRanker.apply(xxt[i].unsqueeze(dim=0), lambda_val)
        loss += F.mse_loss(feature_ranks, label_ranks)
    return loss


# ---


def value_and_grad(loss_fn, features):
    features = features.clone().requires_grad_(True)
    loss = loss_fn(features)
    loss.backward()
    return loss.detach(), features.grad


@pytest.mark.parametrize("interpolation", [0.5, 2.0, 10.0])
def test_distinct_labels_match_the_reference_loop(interpolation):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 8, dtype=torch.float64, generator=generator)
    labels = torch.randperm(40, generator=generator)[:16].double()  # distinct: no subset in either
    fast, fast_grad = value_and_grad(lambda z: ranksim_loss(z, labels, interpolation), features)
    slow, slow_grad = value_and_grad(
        lambda z: original_batchwise_ranking_regularizer(z, labels[:, None], interpolation), features)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-12)
    assert fast > 0 and fast_grad.abs().sum() > 0


def test_repeated_labels_match_the_reference_loop_on_the_same_subset():
    features = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 12, (40,), generator=torch.Generator().manual_seed(2)).double()
    kept = one_sample_per_label(labels, torch.Generator().manual_seed(3))
    fast, fast_grad = value_and_grad(
        lambda z: ranksim_loss(z, labels, 2.0, generator=torch.Generator().manual_seed(3)), features)
    slow, slow_grad = value_and_grad(
        lambda z: original_batchwise_ranking_regularizer(z, labels[:, None], 2.0, kept), features)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-12)
    dropped = torch.ones(40, dtype=torch.bool)
    dropped[kept] = False
    assert fast_grad[kept].abs().sum() > 0
    assert (fast_grad[dropped] == 0).all()  # samples left out of the subset get no gradient


def test_subset_keeps_one_sample_per_label_reproducibly():
    labels = torch.tensor([3, 1, 3, 3, 7, 1, 5, 7, 7, 7])
    kept = one_sample_per_label(labels, torch.Generator().manual_seed(0))
    assert labels[kept].tolist() == [1, 3, 5, 7]  # one each, in increasing label order
    again = one_sample_per_label(labels, torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)
    # Every sample of a label can be the one kept: all four 7s show up over a few seeds.
    picks = {one_sample_per_label(labels, torch.Generator().manual_seed(seed))[-1].item() for seed in range(60)}
    assert picks == {4, 7, 8, 9}
    assert one_sample_per_label(torch.tensor([2.0, 0.5, 9.0])) is None  # distinct labels: no subset


def test_rank_convention():
    rows = torch.tensor([[0.2, 0.9, -0.1, 0.5]])
    # Descending: 0.9 first (rank 0), then 0.5, 0.2, -0.1; normalised (rank + 1) / n.
    torch.testing.assert_close(rank_normalised(rows), torch.tensor([[3, 1, 4, 2]]) / 4.0)
    torch.testing.assert_close(rank_normalised(rows), original_rank_normalised(rows).float())


def unit_circle(angles):
    angles = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_tiny_cases_by_hand():
    labels = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    # Features on the unit circle at angles 0, 0.4, 1.0: angular gaps follow the label gaps,
    # so every row ranks its neighbours as the labels do.
    ordered, ordered_grad = value_and_grad(lambda z: ranksim_loss(z, labels), unit_circle([0.0, 0.4, 1.0]))
    assert ordered == 0
    assert (ordered_grad == 0).all()
    # Angles 0, 1.0, 0.3: sample 2 now sits next to sample 0. Normalised ranks (1/3, 2/3, 1):
    #   row 0: features cos [1, .540, .955] -> (1/3, 1, 2/3); labels -|dy| [0, -1, -3] -> (1/3, 2/3, 1)
    #   row 1: features [.540, 1, .765]     -> (1, 1/3, 2/3); labels [-1, 0, -2]       -> (2/3, 1/3, 1)
    #   row 2: features [.955, .765, 1]     -> (2/3, 1, 1/3); labels [-3, -2, 0]       -> (1, 2/3, 1/3)
    # Each row has squared differences (0, 1/9, 1/9) in some order: mean 2/27; sum over rows 2/9.
    swapped, swapped_grad = value_and_grad(lambda z: ranksim_loss(z, labels), unit_circle([0.0, 1.0, 0.3]))
    assert swapped.item() == pytest.approx(2 / 9, rel=1e-12)
    assert swapped_grad.abs().sum() > 0  # the ranks disagree: the blackbox gradient is nonzero


def test_gradient_step_reduces_disagreement():
    """Blackbox gradients point towards the label ranking: descending them lowers the loss."""
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(12, 4, dtype=torch.float64, generator=generator)
    labels = torch.arange(12, dtype=torch.float64)
    start = ranksim_loss(features, labels).item()
    for _ in range(50):
        features = features.detach().requires_grad_(True)
        ranksim_loss(features, labels).backward()
        features = features - 0.5 * features.grad
    assert ranksim_loss(features, labels).item() < 0.5 * start


def test_half_precision_and_bad_shapes():
    features = torch.randn(8, 4).bfloat16()
    loss = ranksim_loss(features, torch.arange(8.0))
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    with pytest.raises(ValueError, match="expected features"):
        ranksim_loss(torch.randn(8, 4), torch.arange(8.0)[:, None])
