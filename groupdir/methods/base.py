"""What a method sees of a training step, and what every method may share."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from groupdir.distributed import global_batch
from groupdir.model import Output


@dataclasses.dataclass(frozen=True)
class Step:
    """One training step's batch, for the method's loss. With `views` = 2 the batch holds each image
    twice (sample i + B is the second view of sample i) and the labels are repeated alike."""
    output: Output
    labels: torch.Tensor                # float32 (B,) on the device
    groups: torch.Tensor                # the labels' group indices (B,)
    bins: torch.Tensor                  # the labels' bins of width label_bin_width (B,), from the exact labels
    weights: torch.Tensor | None        # re-weighting (reweight / lds), None for none
    group_log_prior: torch.Tensor       # log prior of the classifier's targets (balanced losses add it)
    number: int                         # the optimizer step: batch-level draws alike on every worker
    state: torch.nn.Module | None       # the method's own parameters or statistics (DIRNet.method_state)


class Defaults:
    """What most methods share: one regressor, one view per image, no state of their own, nothing
    after training. A method overrides only what it does differently."""
    grouped, views, pretrains = False, 1, False

    def state(self, cfg, feature_dim, train_labels):
        return None

    def after_training(self, net, plain_train_loader, grouping, group_log_prior, cfg, device) -> dict | None:
        return None


def batch_scope(cfg, features: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The batch a batch-defined loss sees: every worker's (contrast_scope=global) or this worker's."""
    if cfg.contrast_scope == "global":
        return global_batch(features, *others)
    return (features, *others)


def step_generator(cfg, number: int) -> torch.Generator:
    """Draws for a step's batch-level sampling, the same on every worker (the global batch is too)."""
    state = np.random.SeedSequence([cfg.seed, number]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))
