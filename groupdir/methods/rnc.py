"""Rank-N-Contrast (Zha et al., NeurIPS 2023): pretrains the encoder alone, on two augmented views
of each image. For anchor i and positive j, the denominator runs over every k whose label is at
least as far from i's as j's is:

    L = -1/(N(N-1)) sum_i sum_{j != i} log( exp(s_ij / t) / sum_{k != i, |y_i - y_k| >= |y_i - y_j|} exp(s_ik / t) )

with s = -||z_i - z_j|| on the raw (unnormalised) features. That is paper Eq. 2 with label bins
(width label_bin_width) for groups, so the same O(N^2) histogram loss computes it (the Triton
kernel works on L2-normalised features only, so RnC runs the torch form). The regressor is not
trained: a second run with init_from=RUN/checkpoint.pt trains one (freeze_encoder=true: RnC's
linear probe) or fine-tunes with any method."""

from __future__ import annotations

from groupdir.losses import group_contrastive_loss
from groupdir.methods.base import Defaults, Step, batch_scope


class RankNContrast(Defaults):
    views, pretrains = 2, True

    def loss_terms(self, cfg, step: Step):
        features, bins = batch_scope(cfg, step.output.features, step.bins)
        loss = group_contrastive_loss(features, bins - bins.min(), cfg.rnc_temperature, "euclidean",
                                      "torch" if cfg.loss_backend == "auto" else cfg.loss_backend,
                                      normalize=False)
        return {"total": loss, "rnc": loss}
