"""Feature Distribution Smoothing (FDS, Yang et al., ICML 2021, YyzHarry/imbalanced-regression).

Per label bin b the module keeps running statistics (mu_b, var_b) of the features, smooths them across
neighbouring bins with the LDS window (reflect padding at the ends), and calibrates each training
feature z of bin b as

    z' = (z - mu_b) * sqrt(clip(var~_b / var_b, 0.1, 10)) + mu~_b

with the statistics of the previous epochs. Differences from the original code, and why:
- The original collects the features in a second, no-grad pass over the training set after each
  epoch. This module accumulates them from the training forward passes of the epoch instead (no
  second pass, which would cost an extra epoch of forward compute each epoch): the statistics mix
  features from the whole epoch's changing weights rather than those of its end.
- It accumulates the incoming (uncalibrated) features. In the original, `smooth` writes into the
  encoding tensor in place, so after start_smooth its second pass collects calibrated features.
- Like the original it tracks per-dimension variances (the diagonal of the covariance): full
  covariances would cost num_bins x D^2 memory (97 x 2048^2 floats for AgeDB's ResNet-50).
- Labels below or above the bin range fall into the edge bins, always; the original does so only
  when the edge label itself occurs in the batch and otherwise skips them.
- The statistics of epoch e calibrate epoch e + 1. The original copies its running statistics to
  the calibration buffers before folding in each epoch's features, which delays them by an epoch
  (and, because it assigns the buffer instead of copying it, its "last epoch" running mean and
  variance alias the current ones while the smoothed ones do not).
- The accumulators are plain tensors, not buffers: DDP broadcasts buffers from rank 0 at every
  forward, which would overwrite the other ranks' sums. `end_epoch` sums them over the workers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FeatureSmoothing(nn.Module):
    def __init__(self, feature_dim: int, first_bin: int, num_bins: int, bin_width: float,
                 window: np.ndarray, momentum: float = 0.9, start_smooth: int = 1,
                 clip: tuple = (0.1, 10.0)):
        super().__init__()
        window = np.asarray(window, dtype=np.float64)
        if window.ndim != 1 or len(window) % 2 == 0:
            raise ValueError(f"the window must be 1-D of odd length, got shape {window.shape}")
        if num_bins <= len(window) // 2:
            raise ValueError(f"reflect padding needs num_bins={num_bins} > half the window "
                             f"({len(window) // 2})")
        self.feature_dim, self.first_bin, self.num_bins = feature_dim, first_bin, num_bins
        self.bin_width, self.momentum, self.start_smooth = bin_width, momentum, start_smooth
        self.clip = (float(clip[0]), float(clip[1]))
        # A config, not state: rebuilt from the arguments, so kept out of the checkpoint.
        self.register_buffer("window", torch.as_tensor(window / window.sum()),
                             persistent=False)
        shape = (num_bins, feature_dim)
        for name, fill in (("running_mean", 0.0), ("running_var", 1.0), ("smoothed_mean", 0.0),
                           ("smoothed_var", 1.0), ("last_epoch_mean", 0.0), ("last_epoch_var", 1.0)):
            self.register_buffer(name, torch.full(shape, fill))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        self._reset_accumulators(torch.device("cpu"))

    def label_bins(self, labels: torch.Tensor) -> torch.Tensor:
        """Bin index of each label; the epsilon keeps 0.3 / 0.1 in bin 3, as groupdir.labels does."""
        bins = torch.floor(labels.double() / self.bin_width + 1e-9).long() - self.first_bin
        return bins.clamp(0, self.num_bins - 1)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Accumulates the batch's statistics; returns the calibrated features once smoothing starts."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features of shape (N, {self.feature_dim}), "
                             f"got {tuple(features.shape)}")
        bins = self.label_bins(labels.reshape(-1))
        if len(bins) != len(features):
            raise ValueError(f"{len(bins)} labels for {len(features)} features")
        self._accumulate(features.detach(), bins)
        if int(self.epochs_done) < self.start_smooth:
            return features
        return self.calibrate(features, bins)

    def calibrate(self, features: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """z' = (z - m1_b) * s_b + m2_b per sample of bin b, gathered from per-bin tables."""
        shift_in, scale, shift_out = self._calibration_tables()
        dtype = torch.promote_types(features.dtype, torch.float32)
        shift_in, scale, shift_out = (t.to(dtype)[bins] for t in (shift_in, scale, shift_out))
        return ((features.to(dtype) - shift_in) * scale + shift_out).to(features.dtype)

    @torch.no_grad()
    def end_epoch(self, all_reduce: Callable[[torch.Tensor], object] | None = None) -> None:
        """Folds the epoch's features into the running statistics and smooths them for the next epoch.

        `all_reduce` sums a tensor in place over the data-parallel workers (None: one process).
        """
        # Every rank's sums must sit where its stats do (NCCL reduces device tensors only).
        self._reset_accumulators(self.running_mean.device, keep=True)
        if all_reduce is not None:
            for total in (self._count, self._sum, self._sum_sq):
                all_reduce(total)
        seen = self._count > 0
        epoch_mean, epoch_var = self._epoch_stats()
        # The first epoch takes its statistics as they are (the original's start_update).
        factor = 0.0 if int(self.epochs_done) == 0 else self.momentum
        for running, epoch_stat in ((self.running_mean, epoch_mean), (self.running_var, epoch_var)):
            updated = (1 - factor) * epoch_stat.to(running.dtype) + factor * running
            running.copy_(torch.where(seen[:, None], updated, running))
        self.smoothed_mean.copy_(self._smooth_over_bins(self.running_mean))
        self.smoothed_var.copy_(self._smooth_over_bins(self.running_var))
        self.last_epoch_mean.copy_(self.running_mean)
        self.last_epoch_var.copy_(self.running_var)
        self.epochs_done += 1
        self._reset_accumulators(self._count.device)

    def _accumulate(self, features: torch.Tensor, bins: torch.Tensor) -> None:
        if self._sum.device != features.device:
            self._reset_accumulators(features.device, keep=True)
        features = features.double()
        self._count.index_add_(0, bins, torch.ones_like(features[:, 0]))
        self._sum.index_add_(0, bins, features)
        self._sum_sq.index_add_(0, bins, features * features)

    def _epoch_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bin mean and unbiased variance of the epoch (biased for a single sample, as the original)."""
        count = self._count[:, None]
        mean = self._sum / count.clamp_min(1)
        squared_deviations = (self._sum_sq - count * mean * mean).clamp_min(0)
        return mean, squared_deviations / (count - 1).clamp_min(1)

    def _smooth_over_bins(self, stats: torch.Tensor) -> torch.Tensor:
        half = len(self.window) // 2
        per_dim = stats.T.unsqueeze(1)  # (D, 1, num_bins): each feature dimension is one signal
        padded = F.pad(per_dim, (half, half), mode="reflect")
        kernel = self.window.to(stats.dtype).view(1, 1, -1)
        return F.conv1d(padded, kernel).squeeze(1).T

    def _calibration_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-bin (m1, s, m2), the identity (0, 1, 0) where the original's calibrate_mean_var leaves
        features alone: the whole bin when its variances sum below 1e-10, else dimensions of zero
        variance."""
        var = self.last_epoch_var
        keep = (var.sum(dim=1, keepdim=True) >= 1e-10) & (var != 0)
        ratio = (self.smoothed_var / torch.where(keep, var, torch.ones_like(var))).clamp(*self.clip)
        scale = torch.where(keep, ratio.sqrt(), torch.ones_like(ratio))
        zero = torch.zeros_like(var)
        return (torch.where(keep, self.last_epoch_mean, zero), scale,
                torch.where(keep, self.smoothed_mean, zero))

    def _reset_accumulators(self, device: torch.device, keep: bool = False) -> None:
        """Zeroed per-bin count, sum and sum of squares (float64) on `device`; `keep` moves them instead."""
        if keep:
            totals = (self._count, self._sum, self._sum_sq)
            self._count, self._sum, self._sum_sq = (total.to(device) for total in totals)
            return
        self._count = torch.zeros(self.num_bins, dtype=torch.float64, device=device)
        self._sum = torch.zeros(self.num_bins, self.feature_dim, dtype=torch.float64, device=device)
        self._sum_sq = torch.zeros_like(self._sum)


def feature_smoothing(cfg, feature_dim: int, train_labels: np.ndarray) -> FeatureSmoothing:
    """FDS over the training labels' bins (width label_bin_width), with the config's kernel."""
    from groupdir.labels import label_bins
    from groupdir.losses.regression import lds_kernel

    bins = label_bins(train_labels, cfg.label_bin_width)
    return FeatureSmoothing(feature_dim, int(bins.min()), int(bins.max() - bins.min()) + 1, cfg.label_bin_width,
                            lds_kernel(cfg.fds_kernel, cfg.fds_ks, cfg.fds_sigma), cfg.fds_momentum,
                            cfg.fds_start_smooth)
