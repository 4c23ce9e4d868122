"""Training methods behind one small interface: the recipe asks the method for its heads, its own
state, its loss terms and its step after training, and never branches on the method's name.

A new method (a DIR baseline) is a module here with a class that has the members of `Method`,
registered in METHODS; the recipe, the driver, the sweep and the benchmarks need no edit. Its
config keys go in groupdir/config.py (with the original paper's defaults).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from groupdir.methods.balanced_mse import BalancedMSE
from groupdir.methods.base import Step
from groupdir.methods.conr import ConR
from groupdir.methods.groupdir import GroupDIR
from groupdir.methods.ranksim import RankSim
from groupdir.methods.rnc import RankNContrast
from groupdir.methods.vanilla import Vanilla
from groupdir.model import DIRNet


class Method(Protocol):
    grouped: bool
    """The model has a group classifier and one regressor per group (else one regressor)."""
    views: int
    """Augmented views of each image per batch: 1, or 2 for the two-view contrastive methods."""
    pretrains: bool
    """Trains the encoder alone (the heads stay frozen); the run delivers its last epoch."""

    def state(self, cfg, feature_dim: int, train_labels: np.ndarray) -> torch.nn.Module | None:
        """The method's own parameters or statistics, kept in the model (DIRNet.method_state) so that
        checkpoints, DDP and the optimizer see them; a `lr` attribute gives them their own rate."""

    def loss_terms(self, cfg, step: Step) -> dict[str, torch.Tensor]:
        """The training loss: {"total": ..., plus each weighted term by name, for the logs}."""

    def after_training(self, net, plain_train_loader, grouping, group_log_prior, cfg, device) -> dict | None:
        """A step on the best-on-validation model before its test evaluation (e.g. re-training
        the classifier); returns numbers to log (rank 0), None when it changed nothing."""


METHODS: dict[str, Method] = {"vanilla": Vanilla(), "groupdir": GroupDIR(), "ranksim": RankSim(),
                              "balanced_mse": BalancedMSE(), "conr": ConR(), "rnc": RankNContrast()}


def get_method(name: str) -> Method:
    return METHODS[name]


def build_model(cfg, train_labels: np.ndarray) -> DIRNet:
    """The run's model: the backbone and the method's heads, its state, and FDS when asked for. The
    trainer and `load_model` both build it here, so a checkpoint always fits."""
    method = get_method(cfg.method)
    net = DIRNet(cfg.backbone, cfg.num_groups, grouped=method.grouped)
    net.method_state = method.state(cfg, net.feature_dim, train_labels)
    if cfg.fds:
        from groupdir.fds import feature_smoothing

        net.feature_smoothing = feature_smoothing(cfg, net.feature_dim, train_labels)
    return net
