"""ConR (Keramati et al., ICLR 2024): the regression loss plus beta x a contrastive regulariser over
two augmented views, whose positives are samples with similar labels and whose negatives are
samples with dissimilar labels but similar predictions, pushed harder the further their labels are
(groupdir/losses/conr.py). Over the global batch by default."""

from __future__ import annotations

import torch

from groupdir.losses import regression_loss
from groupdir.losses.conr import conr_loss
from groupdir.methods.base import Defaults, Step, batch_scope


class ConR(Defaults):
    views = 2

    def loss_terms(self, cfg, step: Step):
        pred = step.output.experts[:, 0]
        reg = regression_loss(pred, step.labels, cfg.reg_loss, step.weights)
        weights = step.weights if step.weights is not None else torch.ones_like(step.labels)
        features, labels, preds, weights = batch_scope(cfg, step.output.features, step.labels,
                                                       pred.detach(), weights)
        contrast = conr_loss(features, labels, preds, weights, cfg.conr_threshold, cfg.conr_temperature,
                             cfg.conr_pushing_power)
        return {"total": reg + cfg.conr_weight * contrast, "reg": reg, "conr": contrast}
