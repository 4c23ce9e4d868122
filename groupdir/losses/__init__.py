"""Losses: the ordinal group contrastive loss (paper Eq. 2), soft group labels (Eq. 4), regression."""

from groupdir.losses.contrastive import group_contrastive_loss
from groupdir.losses.regression import label_weights, regression_loss
from groupdir.losses.soft_labels import soft_group_labels, soft_label_loss

__all__ = ["group_contrastive_loss", "soft_group_labels", "soft_label_loss", "regression_loss", "label_weights"]
