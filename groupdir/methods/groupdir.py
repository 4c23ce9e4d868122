"""Group-DIR (paper Eq. 5): lambda_grc * L_grc + lambda_reg * L_reg + lambda_soft * L_cls, with one
regressor per group, and optionally the group classifier re-trained after training (crt.py)."""

from __future__ import annotations

from groupdir.losses import group_contrastive_loss, group_loss, regression_loss
from groupdir.methods.base import Defaults, Step, batch_scope


class GroupDIR(Defaults):
    grouped = True

    def loss_terms(self, cfg, step: Step):
        """Term by term, in float32 whatever the autocast precision of the forward pass."""
        output, labels, groups, weights = step.output, step.labels, step.groups, step.weights
        experts = output.experts.float()
        # Training regresses every sample with its TRUE group's expert.
        reg = regression_loss(experts.gather(1, groups[:, None]).squeeze(1), labels, cfg.reg_loss, weights)
        cls = group_loss(output.group_logits.float(), groups, cfg.group_loss, cfg.beta, step.group_log_prior)
        if cfg.soft_reduction == "sum":  # the authors' code summed over its batch: B x the mean, B the global batch
            cls = cls * cfg.batch_size
        terms = {"reg": reg, "cls": cls}
        total = cfg.lambda_reg * reg + cfg.lambda_soft * cls
        if cfg.lambda_grc > 0:
            features, contrast_groups = batch_scope(cfg, output.features.float(), groups)
            terms["grc"] = group_contrastive_loss(features, contrast_groups, cfg.temperature, cfg.similarity,
                                                  cfg.loss_backend, cfg.loss_precision, cfg.num_groups)
            total = total + cfg.lambda_grc * terms["grc"]
        return {"total": total, **terms}

    def after_training(self, net, plain_train_loader, grouping, group_log_prior, cfg, device) -> dict | None:
        if not cfg.crt_epochs:
            return None
        from groupdir.crt import retrain_classifier

        return retrain_classifier(net, plain_train_loader(), grouping, group_log_prior, cfg, device)
