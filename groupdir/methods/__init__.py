"""Training methods behind one small interface: the recipe asks the method for its heads, its loss
terms and its step after training, and never branches on the method's name.

A new method (a DIR baseline) is a module here with a class that has the three members of `Method`,
registered in METHODS; the recipe, the driver, the sweep and the benchmarks need no edit. Its
config keys go in groupdir/config.py (with the original paper's defaults).
"""

from __future__ import annotations

from typing import Protocol

import torch

from groupdir.methods.groupdir import GroupDIR
from groupdir.methods.vanilla import Vanilla


class Method(Protocol):
    grouped: bool
    """The model has a group classifier and one regressor per group (else one regressor)."""

    def loss_terms(self, cfg, output, labels: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor | None,
                   group_log_prior: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training loss: {"total": ..., plus each weighted term by name, for the logs}."""

    def after_training(self, net, plain_train_loader, grouping, group_log_prior, cfg, device) -> dict | None:
        """A step on the best-on-validation model before its test evaluation (e.g. re-training
        the classifier); returns numbers to log (rank 0), None when it changed nothing."""


METHODS: dict[str, Method] = {"vanilla": Vanilla(), "groupdir": GroupDIR()}


def get_method(name: str) -> Method:
    return METHODS[name]
