"""Backbone + group classifier + one scalar regressor ("expert") per group.

Training regresses each sample with its TRUE group's expert. At test time a route turns the group
logits and the experts' values into one prediction (groupdir/evaluation.py); the paper's is the
PREDICTED group's expert. The vanilla baseline is the same backbone with a single regressor and no
classifier.

Two optional parts ride along, so that checkpoints, DDP and the optimizer see them like any weight:
`method_state`, a method's own parameters or statistics (Balanced MSE's noise scale), and
`feature_smoothing`, FDS (groupdir/fds.py), which recalibrates the features the heads see in
training and needs the batch's labels to do so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision

from groupdir.config import BACKBONES


@dataclass
class Output:
    features: torch.Tensor             # (B, D) pooled backbone features, the contrastive loss's z
    group_logits: torch.Tensor | None  # (B, G), None for vanilla
    experts: torch.Tensor              # (B, G) one prediction per expert; (B, 1) for vanilla


class DIRNet(nn.Module):
    def __init__(self, backbone: str = "resnet18", num_groups: int = 20, grouped: bool = True,
                 method_state: nn.Module | None = None, feature_smoothing: nn.Module | None = None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
        self.encoder = getattr(torchvision.models, backbone)(weights=None)  # random init, no download
        feature_dim = self.encoder.fc.in_features
        self.encoder.fc = nn.Identity()
        self.classifier = nn.Linear(feature_dim, num_groups) if grouped else None
        # A linear layer with G outputs is G independent scalar regressors on the shared features.
        self.experts = nn.Linear(feature_dim, num_groups if grouped else 1)
        self.method_state = method_state
        self.feature_smoothing = feature_smoothing

    @property
    def feature_dim(self) -> int:
        return self.experts.in_features

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        """`labels`: the training batch's, for FDS (evaluation passes none and gets raw features)."""
        features = self.encoder(images)
        # The heads run in float32 even under bf16 autocast: bf16 steps by 0.25 between ages 32 and
        # 64, too coarse for a regression target.
        with torch.autocast(images.device.type, enabled=False):
            features = features.float()
            if self.feature_smoothing is not None and self.training and labels is not None:
                features = self.feature_smoothing(features, labels)
            logits = self.classifier(features) if self.classifier is not None else None
            return Output(features, logits, self.experts(features))


def forward(model: nn.Module, images: torch.Tensor, device: torch.device, labels: torch.Tensor | None = None) -> Output:
    """A loader's batch (normalised float images) through the model on `device`; channels_last and
    bf16 autocast on CUDA (the heads stay in float32)."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(images) if labels is None else model(images, labels)
