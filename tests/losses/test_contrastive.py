import pytest
import torch

from groupdir.losses import group_contrastive_loss
from groupdir.losses.contrastive import pairwise_similarity


def value_and_grad(z, groups, backend, **kwargs):
    z = z.clone().requires_grad_(True)
    loss = group_contrastive_loss(z, groups, backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), z.grad


CASES = {
    "random": (32, 16, 6),
    "pair": (2, 4, 3),
    "single_group": (10, 8, 1),
    "many_groups": (24, 5, 200),
    "ties": (40, 8, 3),  # 40 samples in 3 groups: many equal group distances
}


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
@pytest.mark.parametrize("case", list(CASES))
def test_histogram_loss_equals_naive_reference(case, similarity):
    batch, dim, num_groups = CASES[case]
    generator = torch.Generator().manual_seed(list(CASES).index(case))
    z = torch.randn(batch, dim, dtype=torch.float64, generator=generator)
    groups = torch.randint(0, num_groups, (batch,), generator=generator)
    kwargs = dict(temperature=0.7, similarity=similarity)
    fast, fast_grad = value_and_grad(z, groups, "torch", **kwargs)
    naive, naive_grad = value_and_grad(z, groups, "naive", **kwargs)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_grad, naive_grad, rtol=1e-8, atol=1e-10)
    if batch > 2:  # with two samples every ratio in Eq. 2 is 1: loss and gradient are 0
        assert fast_grad.abs().sum() > 0


def test_float32_matches_float64_and_is_stable_at_low_temperature():
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    groups = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    for temperature in (2.5, 0.02):
        single = group_contrastive_loss(z, groups, temperature, backend="torch")
        double = group_contrastive_loss(z.double(), groups, temperature, backend="naive")
        assert torch.isfinite(single)
        assert single.dtype == torch.float32
        torch.testing.assert_close(single.double(), double, rtol=1e-4, atol=1e-4)


def test_identical_features_in_euclidean_mode_keep_finite_gradients():
    z = torch.ones(6, 4, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    group_contrastive_loss(z, groups, 1.0, "euclidean").backward()
    assert torch.isfinite(z.grad).all()


def test_loss_rewards_ordinal_features():
    """Features laid out in group order should cost less than the same features shuffled."""
    groups = torch.arange(8).repeat_interleave(4)
    angle = groups.double() * 0.3
    ordered = torch.stack([angle.cos(), angle.sin()], dim=1)
    shuffled = ordered[torch.randperm(len(groups), generator=torch.Generator().manual_seed(0))]
    assert group_contrastive_loss(ordered, groups, 0.1) < group_contrastive_loss(shuffled, groups, 0.1)


def test_no_cubic_memory_in_the_fast_path():
    """B = 1024 would need a 1024^3 (4 GB) mask in the naive loss; the fast path is O(B^2)."""
    z = torch.randn(1024, 16, requires_grad=True)
    groups = torch.randint(0, 20, (1024,))
    group_contrastive_loss(z, groups, backend="torch").backward()
    assert torch.isfinite(z.grad).all()


def test_similarities():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    cosine = pairwise_similarity(z, "cosine")
    torch.testing.assert_close(cosine[0], torch.tensor([1.0, 0.0, -1.0]))
    euclidean = pairwise_similarity(z, "euclidean")
    torch.testing.assert_close(euclidean[0, 1:], torch.tensor([-(2 ** 0.5), -2.0]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="cuda-magic"), "unknown backend"),
    (dict(similarity="dot"), "unknown similarity"),
    (dict(temperature=0.0), "temperature"),
    (dict(precision="fp8"), "unknown precision"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_contrastive_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), **kwargs)


def test_the_torch_path_ignores_the_triton_options():
    z, groups = torch.randn(12, 5), torch.randint(0, 4, (12,))
    plain = group_contrastive_loss(z, groups, backend="torch")
    assert group_contrastive_loss(z, groups, backend="torch", precision="bf16", num_groups=4) == plain


def test_float_groups_are_refused():
    with pytest.raises(ValueError, match="integer group indices"):
        group_contrastive_loss(torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_batch_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        group_contrastive_loss(torch.randn(1, 3), torch.tensor([0]))


def rank_n_contrast_naive(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rank-N-Contrast's loss as its paper and code write it (Zha et al. 2023, RnCLoss): -L2 on the raw
    features, label distance |y_i - y_j|, a loop over the positives."""
    logits = -(features[:, None, :] - features[None, :, :]).norm(2, dim=-1) / temperature
    label_diffs = (labels[:, None] - labels[None, :]).abs()
    n = len(features)
    loss = features.new_zeros(())
    for i in range(n):
        for j in range(n):
            if j == i:
                continue
            others = [k for k in range(n) if k != i and label_diffs[i, k] >= label_diffs[i, j]]
            loss = loss - (logits[i, j] - torch.logsumexp(logits[i, others], 0)) / (n * (n - 1))
    return loss


def test_rank_n_contrast_is_eq2_on_label_bins_with_raw_l2():
    """method=rnc computes RnC with the histogram loss: label bins for groups, -L2 on unnormalised
    features; two views of 6 images with tied labels, values and gradients at float64."""
    from groupdir.methods import Step, get_method
    from groupdir.config import build
    from groupdir.labels import label_bins
    from groupdir.model import Output

    generator = torch.Generator().manual_seed(4)
    labels = torch.tensor([21.0, 25.0, 25.0, 30.0, 42.0, 21.0], dtype=torch.float64).repeat(2)
    features = (3 * torch.randn(12, 5, dtype=torch.float64, generator=generator)).requires_grad_(True)
    naive = rank_n_contrast_naive(features, labels, temperature=2.0)
    naive_grad, = torch.autograd.grad(naive, features)
    cfg = build({"method": "rnc", "rnc_temperature": 2.0})
    step = Step(Output(features, None, torch.zeros(12, 1)), labels, groups=torch.zeros(12, dtype=torch.long),
                bins=torch.as_tensor(label_bins(labels.numpy(), 1.0)), weights=None, group_log_prior=None, number=0,
                state=None)
    ours = get_method("rnc").loss_terms(cfg, step)["total"]
    ours_grad, = torch.autograd.grad(ours, features)
    torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, naive_grad, rtol=1e-8, atol=1e-10)
    assert ours_grad.abs().sum() > 0
    # Normalising first (the Triton kernels' input) is a different loss: RnC's is the raw one.
    normalised = group_contrastive_loss(features, (labels / 1.0).long(), 2.0, "euclidean", "torch")
    assert not torch.isclose(normalised, naive)
