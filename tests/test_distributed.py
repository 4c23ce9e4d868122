"""Global-batch contrast on two real gloo ranks against one process on the concatenated batch."""

import numpy as np
import pytest
import torch

from groupdir.distributed import gather_rows, global_batch, mean_over_workers
from groupdir.losses import group_contrastive_loss
from helpers import on_gloo_ranks

WORLD = 2
PER_RANK = 6
DIM = 5


def batch():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(WORLD * PER_RANK, 8, generator=generator)
    groups = torch.randint(0, 4, (WORLD * PER_RANK,), generator=generator)
    groups[:3] = 1  # ties
    return inputs, groups


def encoder():
    torch.manual_seed(0)
    return torch.nn.Linear(8, DIM)


def _global_step(rank: int) -> dict:
    """One DDP step with the global contrast, and the helpers' results on this rank."""
    inputs, groups = batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    model = torch.nn.parallel.DistributedDataParallel(encoder())
    features = model(inputs[mine])
    features.retain_grad()
    all_features, all_groups = global_batch(features, groups[mine])
    loss = group_contrastive_loss(all_features, all_groups, temperature=0.7)
    loss.backward()
    # Row-wise gathering with the padding a sampler adds (row 0 repeated on the last rank).
    rows = np.arange(rank * 3, rank * 3 + 3) if rank == 0 else np.array([3, 4, 5, 0])
    gathered = gather_rows({"value": rows * 10.0}, rows)
    return {"loss": loss.item(), "groups": all_groups.tolist(), "feature_grad": features.grad.tolist(),
            "weight_grad": model.module.weight.grad.tolist(), "bias_grad": model.module.bias.grad.tolist(),
            "mean": mean_over_workers(torch.tensor([float(rank), float("nan") if rank else 1.0])).tolist(),
            "gathered": gathered["value"].tolist()}


@pytest.mark.slow
def test_global_contrast_equals_one_process_on_the_concatenated_batch(tmp_path):
    ranks = on_gloo_ranks(_global_step, WORLD, tmp_path)

    inputs, groups = batch()
    reference_model = encoder()
    features = reference_model(inputs)
    features.retain_grad()
    reference = group_contrastive_loss(features, groups, temperature=0.7)
    reference.backward()

    for rank, result in enumerate(ranks):
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        assert result["groups"] == groups.tolist()
        assert abs(result["loss"] - reference.item()) < 1e-5
        # Each worker's features get world x dL/dz (every worker computes the same global loss)...
        torch.testing.assert_close(torch.tensor(result["feature_grad"]) / WORLD, features.grad[mine],
                                   rtol=1e-4, atol=1e-6)
        # ... so that after DDP averages over the workers, the weights get exactly dL/dw.
        torch.testing.assert_close(torch.tensor(result["weight_grad"]), reference_model.weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(result["bias_grad"]), reference_model.bias.grad,
                                   rtol=1e-4, atol=1e-6)
        # A NaN on one worker reaches every worker; the rest is the mean.
        assert result["mean"][0] == 0.5 and np.isnan(result["mean"][1])
        # Padded rows are counted once, in row order.
        assert result["gathered"] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]


def test_single_process_helpers_are_identities():
    features, groups = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    same_features, same_groups = global_batch(features, groups)
    assert same_features is features and same_groups is groups
    assert gather_rows({"v": np.array([5.0, 6.0, 5.0])}, np.array([1, 0, 1]))["v"].tolist() == [6.0, 5.0]
