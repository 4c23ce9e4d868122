"""The group classifier's loss: symmetric descending soft labels (paper Eq. 4) or plain CE, each
optionally balanced (balanced softmax, Ren et al. 2020: the loss sees logits + log pi_train, so
the logits themselves learn no training prior; at test time they are used as they are)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_group_labels(groups: torch.Tensor, num_groups: int, beta: float = 1.0) -> torch.Tensor:
    """(B, G) targets, row b = softmax over j of |G| - beta * |j - g_b| (peak at the true group)."""
    positions = torch.arange(num_groups, device=groups.device)
    logits = num_groups - beta * (positions[None, :] - groups[:, None]).abs().float()
    return logits.softmax(dim=1)


def soft_label_loss(group_logits: torch.Tensor, groups: torch.Tensor, beta: float) -> torch.Tensor:
    """Soft cross-entropy -sum_j q_j log p_j, averaged over the batch (the authors summed it)."""
    targets = soft_group_labels(groups, group_logits.shape[1], beta).to(group_logits.dtype)
    return -(targets * F.log_softmax(group_logits, dim=1)).sum(dim=1).mean()


def group_loss(group_logits: torch.Tensor, groups: torch.Tensor, kind: str = "soft", beta: float = 1.0,
               log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch. kind: soft | ce | soft_balanced | ce_balanced; the balanced kinds need
    `log_prior` (G,), the log group prior of the training targets (evaluation.label_prior)."""
    if kind.endswith("_balanced"):
        if log_prior is None:
            raise ValueError(f"group_loss={kind!r} needs the training group prior")
        group_logits = group_logits + log_prior.to(group_logits)
    if kind.startswith("soft"):
        return soft_label_loss(group_logits, groups, beta)
    if kind.startswith("ce"):
        return F.cross_entropy(group_logits, groups)
    raise ValueError(f"unknown group loss {kind!r}: use soft, ce, soft_balanced or ce_balanced")
