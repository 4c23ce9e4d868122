"""Losses: the ordinal group contrastive loss (paper Eq. 2), the group classifier's loss (soft
labels, Eq. 4, or CE, optionally balanced), regression."""

from groupdir.losses.contrastive import group_contrastive_loss
from groupdir.losses.regression import label_weights, regression_loss
from groupdir.losses.soft_labels import group_loss, soft_group_labels, soft_label_loss

__all__ = ["group_contrastive_loss", "soft_group_labels", "soft_label_loss", "group_loss", "regression_loss",
           "label_weights"]
