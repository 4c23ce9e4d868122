"""Classifier re-training on frozen features: only the classifier moves, and it learns balance."""

import numpy as np
import torch

from groupdir.config import load_config
from groupdir.crt import fit_balanced, retrain_classifier
from groupdir.data import open_data
from groupdir.model import DIRNet
from groupdir.recipe import supervision


def test_crt_changes_only_the_classifier(tiny_synth):
    cfg = load_config(overrides={"data": str(tiny_synth), "num_groups": 5, "crt_epochs": 2, "batch_size": 64,
                                 "image_size": 32})
    labels, loaders = open_data(cfg, ["train"], augmented=None)
    targets = supervision(cfg, labels)
    torch.manual_seed(0)
    net = DIRNet("resnet18", 5)
    net.train()  # BatchNorm statistics must not move even if the model arrives in training mode
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = retrain_classifier(net, loaders["train"], targets.grouping, targets.group_log_prior, cfg,
                               torch.device("cpu"))
    assert stats["crt/steps"] == 2 * (len(labels) // 64)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_the_balanced_loss_undoes_a_skewed_prior():
    # Two groups told apart by one feature, 95% of the samples in group 0, overlapping clouds: a
    # classifier trained with the balanced loss puts its boundary near the middle, so it recalls the
    # rare group about as well as the frequent one (plain CE would recall about a third of it).
    rng = np.random.default_rng(0)
    groups = torch.as_tensor(np.r_[np.zeros(1900), np.ones(100)].astype(np.int64))
    features = torch.as_tensor(rng.normal(0, 1, (2000, 4)), dtype=torch.float32)
    features[:, 0] += 2.0 * groups
    cfg = load_config(overrides={"group_loss": "ce", "crt_epochs": 20, "batch_size": 100, "lr": 0.05,
                                 "weight_decay": 0.0, "num_groups": 2})
    classifier = torch.nn.Linear(4, 2)
    fit_balanced(classifier, features, groups, torch.tensor([0.95, 0.05]).log(), cfg)
    chosen = classifier(features).argmax(1)
    recall = [float((chosen[groups == g] == g).float().mean()) for g in (0, 1)]
    assert min(recall) > 0.7, recall
