"""RankSim (Gong et al., ICML 2022): the regression loss plus gamma x the ranking-similarity
regulariser, which asks each sample's ranking of the batch by feature similarity to match its
ranking by label similarity (groupdir/losses/ranksim.py). Over the global batch by default."""

from __future__ import annotations

from groupdir.losses import regression_loss
from groupdir.losses.ranksim import ranksim_loss
from groupdir.methods.base import Defaults, Step, batch_scope, step_generator


class RankSim(Defaults):
    def loss_terms(self, cfg, step: Step):
        reg = regression_loss(step.output.experts[:, 0], step.labels, cfg.reg_loss, step.weights)
        features, labels = batch_scope(cfg, step.output.features, step.labels)
        # Its one-sample-per-label subset is drawn from (seed, step): every worker keeps the same rows.
        ranking = ranksim_loss(features, labels, cfg.ranksim_interpolation, step_generator(cfg, step.number))
        return {"total": reg + cfg.ranksim_weight * ranking, "reg": reg, "ranksim": ranking}
