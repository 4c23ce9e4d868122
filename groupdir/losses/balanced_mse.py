"""Balanced MSE (Ren et al., CVPR 2022): the NLL of a Gaussian prediction N(y; pred, s) under the
balanced label distribution, obtained from the training one by dividing out the training label
prior p(y):

    L = -log N(y; pred, s) + log  integral N(y'; pred, s) p(y') dy'

with s = noise_var, usually learnt (sigma = sqrt(s) as a parameter with its own learning rate).
Two ways to get the integral, following jiawei-ren/BalancedMSE (imdb-wiki-dir/balanaced_mse.py):
- BMC (batch Monte Carlo): p(y') ~ the batch's own targets, which turns L into a cross-entropy over
  the batch with logits -(pred_i - y_j)^2 / 2s;
- GAI (GMM analytic integration): p(y') a Gaussian mixture fitted to the training labels, for which
  the integral is closed-form: sum_k w_k N(pred; mu_k, var_k + s).
Both are scaled by (2 s).detach() as the original, so that the loss reads like an MSE while s is
learnt.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def bmc_loss(pred: torch.Tensor, target: torch.Tensor, noise_var: torch.Tensor,
             candidates: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Batch-based Monte-Carlo Balanced MSE of pred (B,) against target (B,).

    Row i is a B'-way classification over the candidate labels (default: `target`), its right class
    candidate `offset + i`. For data-parallel training give every worker candidates = all workers'
    targets concatenated in rank order and offset = rank * B: the mean over workers of their losses
    (what averaging the gradients does) is then the loss on the whole global batch.
    """
    _check_pair(pred, target)
    candidates = target if candidates is None else candidates
    if candidates.dim() != 1 or not 0 <= offset <= len(candidates) - len(pred):
        raise ValueError(f"candidates of shape {tuple(candidates.shape)} and offset={offset} do not hold the "
                         f"{len(pred)} targets of this batch")
    noise_var = torch.as_tensor(noise_var, dtype=pred.dtype, device=pred.device)
    logits = -(pred[:, None] - candidates[None, :]).pow(2) / (2 * noise_var)
    right_class = torch.arange(offset, offset + len(pred), device=pred.device)
    # (2 s).detach() restores the MSE scale without changing which s minimises the loss.
    return F.cross_entropy(logits, right_class) * (2 * noise_var).detach()


def gai_loss(pred: torch.Tensor, target: torch.Tensor, gmm: dict[str, torch.Tensor],
             noise_var: torch.Tensor) -> torch.Tensor:
    """GMM-based analytic integration Balanced MSE of pred (B,) against target (B,); `gmm` holds
    'means', 'variances', 'weights' (K,) of the training label prior, e.g. from fit_gmm.

    Per sample, as the original: (pred - y)^2 / 2s + 0.5 log s + balancing_term, times (2 s).detach(),
    averaged. The original drops 0.5 log(2 pi) from both -log N(y; pred, s) and the log integral;
    they cancel, so the loss is exactly the L of the module docstring times 2s.
    """
    _check_pair(pred, target)
    noise_var = torch.as_tensor(noise_var, dtype=pred.dtype, device=pred.device)
    mse_term = (pred - target).pow(2) / (2 * noise_var) + 0.5 * noise_var.log()
    loss = mse_term + balancing_term(pred, gmm, noise_var)
    return (loss * (2 * noise_var).detach()).mean()


def balancing_term(pred: torch.Tensor, gmm: dict[str, torch.Tensor], noise_var: torch.Tensor) -> torch.Tensor:
    """(B,) log sum_k w_k N(pred; mu_k, var_k + s) + 0.5 log(2 pi), i.e. the log of
    integral N(y; pred, s) p_gmm(y) dy without its 2 pi constant (as the original)."""
    means, variances, weights = (gmm[key].reshape(1, -1) for key in ("means", "variances", "weights"))
    total_var = variances + noise_var
    log_terms = -0.5 * total_var.log() - 0.5 * (pred[:, None] - means).pow(2) / total_var + weights.log()
    return torch.logsumexp(log_terms, dim=1)


def fit_gmm(labels: np.ndarray, components: int = 8, iterations: int = 200,
            variance_floor: float | None = None) -> dict[str, np.ndarray]:
    """1-D Gaussian mixture of the labels by EM: 'means', 'variances', 'weights', each (components,).

    Replaces the original's sklearn GaussianMixture(n_components=8, random_state=0). Deterministic:
    the means start at the quantiles (k + 1/2) / K, the variances at var(labels) / K, the weights
    uniform: nothing is random. EM runs on the distinct labels
    weighted by their counts (the same fit, far fewer rows for integer ages). Variances are kept at
    least `variance_floor` (default 1e-3 var(labels)) so that a component on a single repeated label
    cannot collapse to a spike.
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    values, counts = np.unique(labels, return_counts=True)
    if len(values) == 0:
        raise ValueError("fit_gmm needs at least one label")
    counts = counts.astype(np.float64)
    spread = float(np.average((values - np.average(values, weights=counts)) ** 2, weights=counts))
    floor = variance_floor if variance_floor is not None else (1e-3 * spread if spread > 0 else 1e-6)
    quantiles = (np.arange(components) + 0.5) / components
    means = np.quantile(labels, quantiles)
    variances = np.full(components, max(spread / components, floor))
    weights = np.full(components, 1.0 / components)
    for _ in range(iterations):
        responsibility = _responsibilities(values, means, variances, weights)  # (V, K)
        mass = counts @ responsibility  # (K,) labels assigned to each component
        alive = mass > 1e-12 * counts.sum()  # a component that lost all labels keeps its parameters
        safe_mass = np.where(alive, mass, 1.0)
        new_means = (counts * values) @ responsibility / safe_mass
        new_variances = (counts[:, None] * responsibility * (values[:, None] - new_means) ** 2).sum(0) / safe_mass
        means = np.where(alive, new_means, means)
        variances = np.maximum(np.where(alive, new_variances, variances), floor)
        weights = mass / counts.sum()
    return {"means": means, "variances": variances, "weights": weights}


def _responsibilities(values: np.ndarray, means: np.ndarray, variances: np.ndarray,
                      weights: np.ndarray) -> np.ndarray:
    """(V, K) posterior probability of each component for each value, computed in log space."""
    with np.errstate(divide="ignore"):  # log(0) = -inf for a dead component is what we want
        log_joint = (np.log(weights) - 0.5 * np.log(2 * np.pi * variances)
                     - 0.5 * (values[:, None] - means) ** 2 / variances)
    log_joint -= log_joint.max(axis=1, keepdims=True)
    joint = np.exp(log_joint)
    return joint / joint.sum(axis=1, keepdims=True)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    # (B, 1) against (B,) would silently broadcast to (B, B).
    if pred.dim() != 1 or target.shape != pred.shape:
        raise ValueError(f"expected pred and target of shape (B,), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
