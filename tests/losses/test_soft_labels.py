import pytest
import torch
import torch.nn.functional as F

from groupdir.losses import group_loss, soft_group_labels, soft_label_loss


def test_soft_labels_shape_sum_peak_symmetry_and_descent():
    num_groups = 9
    groups = torch.arange(num_groups)
    q = soft_group_labels(groups, num_groups, beta=0.7)
    assert q.shape == (num_groups, num_groups)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(num_groups))
    assert (q.argmax(dim=1) == groups).all()
    for g in range(num_groups):
        row = q[g]
        for distance in range(1, num_groups):
            left, right = g - distance, g + distance
            if 0 <= left and right < num_groups:
                torch.testing.assert_close(row[left], row[right])  # symmetric around the true group
            for j in (left, right):
                if 0 <= j < num_groups and 0 <= j + (1 if j < g else -1) < num_groups:
                    closer = j + (1 if j < g else -1)
                    assert row[j] < row[closer]  # strictly descending with distance


@pytest.mark.parametrize("beta", [0.3, 1.0, 2.5])
def test_each_group_further_away_gets_exp_beta_times_less(beta):
    """The paper's soft labels descend geometrically: q_j / q_(j+1) = exp(beta) moving away from
    the true group, on either side, whatever G."""
    q = soft_group_labels(torch.tensor([3]), 7, beta=beta)[0].double()
    ratios = [q[j] / q[j - 1] for j in range(4, 7)] + [q[j] / q[j + 1] for j in range(0, 3)]
    torch.testing.assert_close(torch.stack(ratios), torch.full((6,), torch.exp(torch.tensor(-beta)).item(),
                                                               dtype=torch.float64), rtol=1e-5, atol=0)


def test_beta_zero_is_uniform_and_large_beta_is_one_hot():
    uniform = soft_group_labels(torch.tensor([1]), 4, beta=0.0)
    torch.testing.assert_close(uniform, torch.full((1, 4), 0.25))
    sharp = soft_group_labels(torch.tensor([1]), 4, beta=50.0)
    assert sharp[0, 1] > 0.999


def test_soft_label_loss_is_smallest_at_the_target_distribution():
    groups = torch.tensor([2, 0])
    q = soft_group_labels(groups, 5, beta=1.0)
    best = soft_label_loss(q.log(), groups, beta=1.0)
    worse = soft_label_loss(torch.zeros(2, 5), groups, beta=1.0)
    assert best < worse


def test_balanced_losses_are_the_plain_losses_on_prior_shifted_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator)
    groups = torch.tensor([0, 0, 0, 1, 2, 3])
    log_prior = torch.tensor([0.7, 0.1, 0.1, 0.1]).log()
    torch.testing.assert_close(group_loss(logits, groups, "ce_balanced", log_prior=log_prior),
                               F.cross_entropy(logits + log_prior, groups))
    torch.testing.assert_close(group_loss(logits, groups, "soft_balanced", beta=0.5, log_prior=log_prior),
                               soft_label_loss(logits + log_prior, groups, beta=0.5))
    assert not torch.allclose(group_loss(logits, groups, "ce_balanced", log_prior=log_prior),
                              group_loss(logits, groups, "ce"))
    with pytest.raises(ValueError, match="needs the training group prior"):
        group_loss(logits, groups, "soft_balanced")
