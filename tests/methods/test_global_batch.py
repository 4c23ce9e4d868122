"""Every method's loss on two real gloo ranks (DDP) against one process on the concatenated batch:
the logged terms (averaged over workers) and every parameter's gradient must be equal. The batch-
defined losses (contrast, RankSim, BMC, ConR, RnC) see the global batch; FDS's statistics are
all-reduced."""

import numpy as np
import pytest
import torch

from groupdir.config import build
from groupdir.distributed import mean_over_workers, sum_over_workers, world
from groupdir.grouping import make_grouping
from groupdir.labels import label_bins
from groupdir.methods import Step, get_method
from groupdir.model import Output
from helpers import on_gloo_ranks

WORLD = 2
PER_RANK = 8
DIM = 6
CASES = {
    "groupdir": {"method": "groupdir", "num_groups": 4},
    "ranksim": {"method": "ranksim"},
    "bmc": {"method": "balanced_mse", "balanced_mse": "bmc"},
    "gai": {"method": "balanced_mse", "balanced_mse": "gai", "gmm_components": 2},
    "conr": {"method": "conr", "conr_threshold": 2.0},
    "rnc": {"method": "rnc"},
    "fds": {"method": "vanilla", "fds": True, "fds_ks": 3},
}


def config(case: str):
    return build({"batch_size": WORLD * PER_RANK, "workers": WORLD, "num_groups": 4, **CASES[case]})


def batch():
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(WORLD * PER_RANK, 8, generator=generator)
    labels = torch.randint(20, 32, (WORLD * PER_RANK,), generator=generator).float()
    labels[:3] = 25.0  # ties
    return inputs, labels


class TinyNet(torch.nn.Module):
    """A linear 'encoder' with the method's heads, state and FDS: DIRNet's parts on 8 inputs."""

    def __init__(self, cfg, train_labels):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(8, DIM)
        grouped = get_method(cfg.method).grouped
        self.classifier = torch.nn.Linear(DIM, cfg.num_groups) if grouped else None
        self.experts = torch.nn.Linear(DIM, cfg.num_groups if grouped else 1)
        self.method_state = get_method(cfg.method).state(cfg, DIM, train_labels)
        self.feature_smoothing = None
        if cfg.fds:
            from groupdir.fds import feature_smoothing

            self.feature_smoothing = feature_smoothing(cfg, DIM, train_labels)
        if get_method(cfg.method).pretrains:
            self.experts.requires_grad_(False)

    def forward(self, inputs, labels):
        features = self.encoder(inputs)
        if self.feature_smoothing is not None:
            features = self.feature_smoothing(features, labels)
        logits = self.classifier(features) if self.classifier is not None else None
        return Output(features, logits, self.experts(features))


def one_step(case: str, rows: slice) -> dict:
    """Two training steps of `case` on the inputs' `rows` (FDS: the first gathers statistics, the
    second calibrates); the terms of the second averaged over the workers, and every gradient."""
    cfg = config(case)
    inputs, labels = batch()
    net = TinyNet(cfg, labels.numpy())
    model = torch.nn.parallel.DistributedDataParallel(net) if world()[1] > 1 else net
    grouping = make_grouping(labels.numpy(), cfg.num_groups, cfg.grouping)
    log_prior = torch.log(torch.full((cfg.num_groups,), 1.0 / cfg.num_groups))
    for number in range(2):
        net.zero_grad()
        mine = labels[rows]
        output = model(inputs[rows], mine)
        groups = torch.as_tensor(grouping.assign(mine.numpy()))
        bins = torch.as_tensor(label_bins(mine.numpy(), cfg.label_bin_width))
        step = Step(output, mine, groups, bins, None, log_prior, number, net.method_state)
        terms = get_method(cfg.method).loss_terms(cfg, step)
        terms["total"].backward()
        if net.feature_smoothing is not None and number == 0:
            net.feature_smoothing.end_epoch(sum_over_workers)
    values = mean_over_workers(torch.stack([term.detach() for term in terms.values()]))
    return {"terms": dict(zip(terms, values.tolist())),
            "grads": {name: p.grad.tolist() for name, p in net.named_parameters() if p.grad is not None}}


def every_case(rank: int) -> dict:
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return {case: one_step(case, rows) for case in CASES}


@pytest.mark.slow
def test_every_method_on_two_workers_equals_one_process_on_the_concatenated_batch(tmp_path):
    ranks = on_gloo_ranks(every_case, WORLD, tmp_path)
    for case in CASES:
        reference = one_step(case, slice(None))
        for result in ranks:
            assert result[case]["terms"].keys() == reference["terms"].keys(), case
            for name, value in reference["terms"].items():
                assert result[case]["terms"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (case, name)
            assert result[case]["grads"].keys() == reference["grads"].keys(), case
            for name, grad in reference["grads"].items():
                np.testing.assert_allclose(result[case]["grads"][name], grad, rtol=2e-4, atol=1e-6,
                                           err_msg=f"{case}: {name}")
        assert any(np.abs(np.asarray(grad)).sum() > 0 for grad in reference["grads"].values()), case
