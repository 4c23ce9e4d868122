"""Regression loss with optional per-sample weights, and the field's re-weighting baselines.

Re-weighting (Yang et al. 2021): per label bin, weight = 1 / count, where count is the training
count clipped to [5, 1000] (`inverse`) or its square root (`sqrt_inv`), optionally smoothed by LDS
(a kernel with peak 1 convolved over the count histogram). Weights are rescaled to mean 1 over the
training samples.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from groupdir.labels import label_bins


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1",
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "l1":
        per_sample = F.l1_loss(pred, target, reduction="none")
    elif kind == "mse":
        per_sample = F.mse_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"unknown regression loss {kind!r}: use l1 or mse")
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def lds_kernel(kind: str, size: int, sigma: float) -> np.ndarray:
    """Symmetric smoothing window of odd `size` with its peak equal to 1."""
    # scipy here, not at the top: importing scipy.signal costs every Ray worker a second at start-up
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal.windows import triang

    half = size // 2
    if kind == "gaussian":
        delta = np.zeros(size)
        delta[half] = 1.0
        window = gaussian_filter1d(delta, sigma=sigma)
    elif kind == "triang":
        window = triang(size)
    elif kind == "laplace":
        window = np.exp(-np.abs(np.arange(-half, half + 1)) / sigma)
    else:
        raise ValueError(f"unknown LDS kernel {kind!r}: use gaussian, triang or laplace")
    return window / window.max()


def label_weights(train_labels, reweight: str = "none", lds: bool = False, kernel: str = "gaussian",
                  kernel_size: int = 5, sigma: float = 2.0, bin_width: float = 1.0):
    """A function mapping labels to loss weights (mean 1 over `train_labels`), or None for `none`."""
    if reweight == "none":
        return None
    bins = label_bins(train_labels, bin_width)
    # With LDS the histogram extends half a kernel past the observed labels, so edge bins are smoothed
    # against empty neighbours (clipped to 5 for `inverse`) as in the field's code.
    pad = kernel_size // 2 if lds else 0
    low = bins.min() - pad
    counts = np.bincount(bins - low, minlength=bins.max() + pad - low + 1).astype(np.float64)
    if reweight == "inverse":
        effective = np.clip(counts, 5, 1000)
    elif reweight == "sqrt_inv":
        effective = np.sqrt(counts)
    else:
        raise ValueError(f"unknown reweight {reweight!r}: use none, inverse or sqrt_inv")
    if lds:
        from scipy.ndimage import convolve1d

        effective = convolve1d(effective, lds_kernel(kernel, kernel_size, sigma), mode="constant")
    with np.errstate(divide="ignore"):
        per_bin = np.where(effective > 0, 1.0 / effective, 0.0)
    per_bin *= len(bins) / per_bin[bins - low].sum()

    def weigh(labels) -> np.ndarray:
        index = np.clip(label_bins(labels, bin_width) - low, 0, len(per_bin) - 1)
        return per_bin[index].astype(np.float32)

    return weigh

