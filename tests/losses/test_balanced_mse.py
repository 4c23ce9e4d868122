from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from groupdir.losses.balanced_mse import balancing_term, bmc_loss, fit_gmm, gai_loss


def batch(size, seed):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(size, dtype=torch.float64, generator=generator)
    target = pred + 0.7 * torch.randn(size, dtype=torch.float64, generator=generator)
    return pred, target


def naive_bmc(pred, target, noise_var):
    """-mean_i log( exp(-(p_i - y_i)^2 / 2s) / sum_j exp(-(p_i - y_j)^2 / 2s) ) * 2s, one term at a time;
    the 2s factor is detached, as in the original."""
    total = 0
    for i in range(len(pred)):
        numerator = torch.exp(-(pred[i] - target[i]) ** 2 / (2 * noise_var))
        denominator = sum(torch.exp(-(pred[i] - target[j]) ** 2 / (2 * noise_var)) for j in range(len(target)))
        total = total - torch.log(numerator / denominator)
    return total / len(pred) * (2 * noise_var).detach()


def grads(loss_fn, pred, sigma):
    """Loss and its gradients w.r.t. pred and sigma, with noise_var = sigma^2 as the original."""
    pred = pred.clone().requires_grad_(True)
    sigma = sigma.clone().requires_grad_(True)
    loss = loss_fn(pred, sigma ** 2)
    loss.backward()
    return loss.detach(), pred.grad, sigma.grad


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_bmc_equals_the_naive_closed_form(sigma):
    pred, target = batch(10, seed=0)
    sigma = torch.tensor(sigma, dtype=torch.float64)
    fast = grads(lambda p, s: bmc_loss(p, target, s), pred, sigma)
    naive = grads(lambda p, s: naive_bmc(p, target, s), pred, sigma)
    for fast_part, naive_part in zip(fast, naive):
        torch.testing.assert_close(fast_part, naive_part, rtol=1e-10, atol=1e-12)
    assert fast[1].abs().sum() > 0 and fast[2] != 0


@pytest.mark.parametrize("workers", [2, 4])
def test_bmc_split_over_workers_equals_the_whole_batch(workers):
    pred, target = batch(12, seed=1)
    sigma = torch.tensor(0.8, dtype=torch.float64)
    share = len(pred) // workers

    def split_loss(p, s):
        # Worker r holds rows r*share:(r+1)*share and sees every worker's targets as candidates;
        # data-parallel training averages the workers' gradients, hence the mean.
        losses = [bmc_loss(p[r * share:(r + 1) * share], target[r * share:(r + 1) * share], s,
                           candidates=target, offset=r * share) for r in range(workers)]
        return torch.stack(losses).mean()

    whole = grads(lambda p, s: bmc_loss(p, target, s), pred, sigma)
    split = grads(split_loss, pred, sigma)
    for whole_part, split_part in zip(whole, split):
        torch.testing.assert_close(split_part, whole_part, rtol=1e-12, atol=1e-14)
    # Without the other workers' targets the loss is a different (smaller-batch) one.
    local = bmc_loss(pred[:share], target[:share], sigma ** 2)
    assert not torch.isclose(local, bmc_loss(pred[:share], target[:share], sigma ** 2, target, 0))


def test_bmc_rejects_broadcasting_shapes():
    pred, target = batch(4, seed=2)
    with pytest.raises(ValueError, match="expected pred and target"):
        bmc_loss(pred[:, None], target, torch.tensor(1.0))
    with pytest.raises(ValueError, match="offset"):
        bmc_loss(pred, target, torch.tensor(1.0), candidates=target, offset=1)


GMM = {"means": torch.tensor([-2.0, 1.0, 6.0], dtype=torch.float64),
       "variances": torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64),
       "weights": torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)}


def gaussian(y, mean, var):
    return torch.exp(-0.5 * (y - mean) ** 2 / var) / torch.sqrt(2 * math.pi * var)


def log_integral(pred, noise_var):
    """log integral N(y; pred, s) p_gmm(y) dy by the trapezoid rule on a fine, wide grid."""
    grid = torch.linspace(-40.0, 40.0, 80_001, dtype=torch.float64)
    prior = sum(w * gaussian(grid, m, v) for m, v, w in zip(GMM["means"], GMM["variances"], GMM["weights"]))
    integrand = gaussian(grid[None, :], pred[:, None], noise_var) * prior
    return torch.trapezoid(integrand, grid, dim=1).log()


def test_gai_balancing_term_is_the_log_integral():
    pred = torch.tensor([-5.0, -2.0, 0.3, 4.0, 9.0], dtype=torch.float64)
    noise_var = torch.tensor(0.7, dtype=torch.float64)
    # The original drops the 0.5 log(2 pi) of the Gaussian normaliser from this term.
    expected = log_integral(pred, noise_var) + 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(balancing_term(pred, GMM, noise_var), expected, rtol=1e-11, atol=1e-11)


def test_gai_loss_is_the_balanced_nll_times_2s():
    """The constants the original drops cancel: the loss is exactly 2s (-log N(y; pred, s) + log integral)."""
    pred, target = batch(6, seed=3)
    noise_var = torch.tensor(1.3, dtype=torch.float64)
    nll = -gaussian(target, pred, noise_var).log() + log_integral(pred, noise_var)
    torch.testing.assert_close(gai_loss(pred, target, GMM, noise_var), (nll * 2 * noise_var).mean(),
                               rtol=1e-10, atol=1e-10)


def test_gai_gradients():
    pred, target = batch(5, seed=4)
    parts = [pred] + [GMM[key] for key in ("means", "variances", "weights")]
    parts = [part.clone().requires_grad_(True) for part in parts]
    noise_var = torch.tensor(0.9, dtype=torch.float64)

    def loss(p, means, variances, weights):
        return gai_loss(p, target, {"means": means, "variances": variances, "weights": weights}, noise_var)

    assert torch.autograd.gradcheck(loss, parts)
    # noise_var's gradient: gradcheck cannot see through the detached 2s factor, so compare with
    # 2s times a central difference of the NLL (= loss / 2s in value).
    sigma = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    gai_loss(pred, target, GMM, sigma ** 2).backward()
    step = 1e-6
    nll = [gai_loss(pred, target, GMM, s ** 2) / (2 * s ** 2) for s in (sigma.detach() + step, sigma.detach() - step)]
    expected = 2 * sigma.detach() ** 2 * (nll[0] - nll[1]) / (2 * step)
    torch.testing.assert_close(sigma.grad, expected, rtol=1e-6, atol=1e-9)


def two_component_sample(size=4000, seed=0):
    rng = np.random.default_rng(seed)
    first = rng.random(size) < 0.6
    return np.where(first, rng.normal(20.0, 3.0, size), rng.normal(50.0, 6.0, size))


def test_fit_gmm_recovers_a_known_mixture_deterministically():
    labels = two_component_sample()
    gmm = fit_gmm(labels, components=2)
    order = np.argsort(gmm["means"])
    np.testing.assert_allclose(gmm["means"][order], [20.0, 50.0], atol=0.5)
    np.testing.assert_allclose(np.sqrt(gmm["variances"][order]), [3.0, 6.0], rtol=0.1)
    np.testing.assert_allclose(gmm["weights"][order], [0.6, 0.4], atol=0.03)
    assert gmm["weights"].sum() == pytest.approx(1.0)
    again = fit_gmm(labels, components=2)
    assert all(np.array_equal(gmm[key], again[key]) for key in gmm)


def test_fit_gmm_variance_floor_stops_a_collapse_on_a_repeated_label():
    labels = np.concatenate([np.full(500, 10.0), two_component_sample(500, seed=1)])
    floor = 1e-3 * labels.var()
    gmm = fit_gmm(labels, components=3)
    # One component sits on the 500 tens (all but alone) and is held at the floor...
    on_ten = np.argmin(np.abs(gmm["means"] - 10.0))
    assert gmm["means"][on_ten] == pytest.approx(10.0, abs=0.01)
    assert gmm["variances"][on_ten] == pytest.approx(floor)
    # ...where without a floor its variance reaches 0 and the fit breaks down.
    with np.errstate(divide="ignore", invalid="ignore"):
        unfloored = fit_gmm(labels, components=3, variance_floor=0.0)
    assert unfloored["variances"].min() == 0 and not np.isfinite(unfloored["weights"]).all()
    assert (gmm["variances"] >= floor).all() and np.isfinite(gmm["weights"]).all()
    constant = fit_gmm(np.full(50, 7.0), components=4)
    assert np.allclose(constant["means"], 7.0) and (constant["variances"] > 0).all()
    # The fit feeds gai_loss as tensors and gives a finite loss.
    tensors = {key: torch.from_numpy(value) for key, value in gmm.items()}
    pred = torch.tensor([10.0, 30.0], dtype=torch.float64)
    assert torch.isfinite(gai_loss(pred, pred + 1, tensors, torch.tensor(1.0, dtype=torch.float64)))
