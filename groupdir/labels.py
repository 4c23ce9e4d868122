"""Label bins and shots: the unit that shots, bMAE, re-weighting and the shard histograms count in,
and the field's shot thresholds (Yang et al. 2021): a label bin is many-shot with more than 100
training samples, few-shot with fewer than 20, median-shot otherwise."""

from __future__ import annotations

import numpy as np

MANY_SHOT = 100
FEW_SHOT = 20
SHOTS = ("all", "many", "median", "few")


def label_bins(labels, bin_width: float = 1.0) -> np.ndarray:
    """Integer bin of each label; the small epsilon keeps 0.3 / 0.1 in bin 3, not 2."""
    return np.floor(np.asarray(labels, dtype=np.float64) / bin_width + 1e-9).astype(np.int64)


def shot_of_bins(bins: np.ndarray, train_labels, many: int = MANY_SHOT, few: int = FEW_SHOT,
                 bin_width: float = 1.0) -> np.ndarray:
    """'many' | 'median' | 'few' for each bin, from the training count of that bin."""
    train_bins, train_counts = np.unique(label_bins(train_labels, bin_width), return_counts=True)
    index = np.searchsorted(train_bins, bins)
    found = (index < len(train_bins)) & (train_bins[np.minimum(index, len(train_bins) - 1)] == bins)
    counts = np.where(found, train_counts[np.minimum(index, len(train_bins) - 1)], 0)
    return np.where(counts > many, "many", np.where(counts < few, "few", "median"))
