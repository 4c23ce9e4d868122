"""Plain regression: one regressor on the encoder's features (the field's baseline; with
`reweight` and `lds` it is the SQINV / LDS baselines, with `fds` FDS, with `init_from` and
`freeze_encoder` a linear probe of a pretrained encoder)."""

from __future__ import annotations

from groupdir.losses import regression_loss
from groupdir.methods.base import Defaults, Step


class Vanilla(Defaults):
    def loss_terms(self, cfg, step: Step):
        reg = regression_loss(step.output.experts.float()[:, 0], step.labels, cfg.reg_loss, step.weights)
        return {"total": reg, "reg": reg}
