"""Balanced MSE (Ren et al., CVPR 2022): the MSE of a balanced (uniform-prior) likelihood, with a
learned noise scale sigma; `balanced_mse=bmc` estimates the training prior from the batch's labels
(the global batch's with contrast_scope=global), `gai` from a Gaussian mixture fitted on the
training labels (groupdir/losses/balanced_mse.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from groupdir.distributed import gather, world
from groupdir.losses.balanced_mse import bmc_loss, fit_gmm, gai_loss
from groupdir.methods.base import Defaults, Step


class NoiseScale(nn.Module):
    """sigma, trained with its own learning rate `lr`, and the training labels' GMM (gai)."""

    def __init__(self, sigma: float, lr: float, gmm: dict | None = None):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))
        self.lr = lr
        for name, values in (gmm or {}).items():
            self.register_buffer(f"gmm_{name}", torch.as_tensor(values, dtype=torch.float32))

    def gmm(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"gmm_{name}") for name in ("means", "variances", "weights")}


class BalancedMSE(Defaults):
    def state(self, cfg, feature_dim, train_labels):
        gmm = fit_gmm(train_labels, cfg.gmm_components) if cfg.balanced_mse == "gai" else None
        return NoiseScale(cfg.noise_sigma, cfg.noise_sigma_lr, gmm)

    def loss_terms(self, cfg, step: Step):
        pred = step.output.experts[:, 0]
        noise_var = step.state.sigma ** 2
        if cfg.balanced_mse == "gai":
            loss = gai_loss(pred, step.labels, step.state.gmm(), noise_var)
        elif cfg.contrast_scope == "global":
            # Each worker's rows against every worker's labels; DDP's mean over workers is then the
            # loss of the global batch.
            rank, _ = world()
            loss = bmc_loss(pred, step.labels, noise_var, gather(step.labels), offset=rank * len(pred))
        else:
            loss = bmc_loss(pred, step.labels, noise_var)
        return {"total": loss, "balanced_mse": loss, "noise_sigma": step.state.sigma.detach().abs()}
