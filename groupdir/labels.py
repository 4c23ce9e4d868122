"""Label bins: the unit that shots, bMAE, re-weighting and the shard histograms count in."""

from __future__ import annotations

import numpy as np


def label_bins(labels, bin_width: float = 1.0) -> np.ndarray:
    """Integer bin of each label; the small epsilon keeps 0.3 / 0.1 in bin 3, not 2."""
    return np.floor(np.asarray(labels, dtype=np.float64) / bin_width + 1e-9).astype(np.int64)
