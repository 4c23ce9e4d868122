"""Symmetric descending soft labels for the group classifier (paper Eq. 4)."""

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
