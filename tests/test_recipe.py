"""The recipe's pieces that need no Ray: the optimizer over a method's parameters."""

import numpy as np
import torch

from groupdir.config import build
from groupdir.methods import build_model
from groupdir.recipe import make_optimizer

LABELS = np.arange(20, 60, dtype=float)


def test_a_methods_own_parameters_get_their_own_rate_and_frozen_weights_none():
    cfg = build({"method": "balanced_mse", "noise_sigma": 2.0, "noise_sigma_lr": 0.05, "optimizer": "sgd",
                 "lr": 0.1, "momentum": 0.8})
    net = build_model(cfg, LABELS)
    net.encoder.requires_grad_(False)
    optimizer = make_optimizer(cfg, net)
    assert isinstance(optimizer, torch.optim.SGD)
    weights, sigma = optimizer.param_groups
    assert sigma["params"] == [net.method_state.sigma] and sigma["lr"] == 0.05 and sigma["weight_decay"] == 0
    assert weights["lr"] == 0.1 and weights["momentum"] == 0.8
    trainable = {id(p) for p in weights["params"]}
    assert trainable == {id(p) for p in net.experts.parameters()}
    assert net.method_state.sigma.item() == 2.0


def test_adam_over_every_weight_by_default():
    cfg = build({"method": "groupdir"})
    net = build_model(cfg, LABELS)
    optimizer = make_optimizer(cfg, net)
    assert isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]["params"]) == len(list(net.parameters()))
