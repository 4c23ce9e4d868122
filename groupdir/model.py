"""Backbone + group classifier + one scalar regressor ("expert") per group, and the routes.

Training regresses each sample with its TRUE group's expert. At test time the PREDICTED group
(argmax of the classifier) picks the expert; the oracle route (true group) and the soft route
(sum_g p(g|x) * y_g, paper Lemma 1) are computed beside it and reported apart. The vanilla baseline
is the same backbone with a single regressor and no classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision

from groupdir.config import BACKBONES

ROUTES = ("predicted", "soft", "oracle")


@dataclass
class Output:
    features: torch.Tensor             # (B, D) pooled backbone features, the contrastive loss's z
    group_logits: torch.Tensor | None  # (B, G), None for vanilla
    experts: torch.Tensor              # (B, G) one prediction per expert; (B, 1) for vanilla


class DIRNet(nn.Module):
    def __init__(self, backbone: str = "resnet18", num_groups: int = 20, grouped: bool = True):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
        self.encoder = getattr(torchvision.models, backbone)(weights=None)  # random init, no download
        feature_dim = self.encoder.fc.in_features
        self.encoder.fc = nn.Identity()
        self.classifier = nn.Linear(feature_dim, num_groups) if grouped else None
        # A linear layer with G outputs is G independent scalar regressors on the shared features.
        self.experts = nn.Linear(feature_dim, num_groups if grouped else 1)

    def forward(self, images: torch.Tensor) -> Output:
        features = self.encoder(images)
        # The heads run in float32 even under bf16 autocast: bf16 steps by 0.25 between ages 32 and
        # 64, too coarse for a regression target.
        with torch.autocast(images.device.type, enabled=False):
            features = features.float()
            logits = self.classifier(features) if self.classifier is not None else None
            return Output(features, logits, self.experts(features))


def route(output: Output, how: str, groups: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) predictions: by the predicted group, the soft mixture, or the true group (oracle)."""
    if output.group_logits is None:
        return output.experts[:, 0]
    if how == "predicted":
        chosen = output.group_logits.argmax(dim=1)
    elif how == "oracle":
        if groups is None:
            raise ValueError("the oracle route needs the true groups")
        chosen = groups
    elif how == "soft":
        return (output.group_logits.softmax(dim=1) * output.experts).sum(dim=1)
    else:
        raise ValueError(f"unknown route {how!r}: use one of {', '.join(ROUTES)}")
    return output.experts.gather(1, chosen[:, None]).squeeze(1)
