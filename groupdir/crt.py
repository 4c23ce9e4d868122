"""Decoupled classifier re-training (cRT; Kang et al., ICLR 2020) for the group classifier.

After the main training the encoder and the experts are frozen. The training split's features are
computed once, without augmentation, in evaluation mode (BatchNorm statistics untouched), and only
the group classifier is trained again on them, from a fresh initialisation, with the balanced form
of its loss (balanced softmax, Ren et al. 2020: the loss sees logits + log pi_train), so its logits
no longer carry the training group prior that makes it route rare labels to the bulk groups.

Balanced softmax rather than cRT's class-balanced sampling, because it measured better on
validation (docs/method-selection.md): with groups of 5 and of 800 training samples, balanced batches show
the few rare samples over and over, and the classifier memorises them; the balanced loss sees every
sample at its natural rate and corrects the prior in the loss, the same target without repetition.

With several workers each predicts its slice of the training split; rank 0 alone gathers the
features, re-trains, and broadcasts the new weights, so every worker evaluates the same model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from groupdir.config import Config
from groupdir.distributed import world
from groupdir.evaluation import predict
from groupdir.grouping import Grouping
from groupdir.losses import group_loss


def retrain_classifier(net, loader, grouping: Grouping, log_prior: torch.Tensor, cfg: Config,
                       device: torch.device) -> dict:
    """Re-train `net.classifier` in place for cfg.crt_epochs epochs; `log_prior` is the log group
    prior of the classifier's training targets (evaluation.label_prior). Returns a few numbers
    about the re-training (rank 0; empty elsewhere)."""
    train = predict(net, loader, device, features=True, root_only=True)  # None on the other ranks
    rank, world_size = world()
    stats = {}
    if rank == 0:
        stats = fit_balanced(net.classifier, torch.from_numpy(train.features),
                             torch.from_numpy(grouping.assign(train.target)), log_prior, cfg)
    if world_size > 1:
        for parameter in net.classifier.parameters():
            dist.broadcast(parameter.data, src=0)
    return stats


def fit_balanced(classifier: torch.nn.Linear, features: torch.Tensor, groups: torch.Tensor,
                 log_prior: torch.Tensor, cfg: Config) -> dict:
    """Re-initialise the linear classifier and train it on (features, groups) with the balanced
    form of cfg.group_loss: shuffled batches of cfg.batch_size, Adam at cfg.lr. Seeded by cfg.seed."""
    generator = torch.Generator().manual_seed(cfg.seed)
    device = classifier.weight.device
    log_prior = log_prior.to(device)
    with torch.no_grad():  # nn.Linear's own initialisation, drawn on the CPU from the seeded generator
        bound = 1 / features.shape[1] ** 0.5
        classifier.weight.copy_(torch.empty(classifier.weight.shape).uniform_(-bound, bound, generator=generator))
        classifier.bias.copy_(torch.empty(classifier.bias.shape).uniform_(-bound, bound, generator=generator))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    balanced = cfg.group_loss.removesuffix("_balanced") + "_balanced"
    classifier.train()
    losses = []
    for _ in range(cfg.crt_epochs):
        order = torch.randperm(len(groups), generator=generator)
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            logits = classifier(features[batch].to(device))
            loss = group_loss(logits.float(), groups[batch].to(device), balanced, cfg.beta, log_prior)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return {"crt/steps": len(losses), "crt/first_loss": losses[0], "crt/last_loss": losses[-1]}
