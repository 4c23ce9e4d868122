"""Plain regression: one regressor on the encoder's features (the field's baseline; with
`reweight` and `lds` it is the SQINV / LDS baselines)."""

from __future__ import annotations

from groupdir.losses import regression_loss


class Vanilla:
    grouped = False

    def loss_terms(self, cfg, output, labels, groups, weights, group_log_prior):
        reg = regression_loss(output.experts.float()[:, 0], labels, cfg.reg_loss, weights)
        return {"total": reg, "reg": reg}

    def after_training(self, net, plain_train_loader, grouping, group_log_prior, cfg, device) -> dict | None:
        return None
