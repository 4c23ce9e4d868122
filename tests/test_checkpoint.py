"""init_from: a checkpoint's encoder starts a run; anything else is refused naming the file."""

import pytest
import torch

from groupdir import checkpoint
from groupdir.config import build
from groupdir.errors import TrainingError
from groupdir.model import DIRNet


def saved_run(tmp_path, backbone="resnet18", grouped=False):
    torch.manual_seed(1)
    net = DIRNet(backbone, 5, grouped=grouped)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "config": build({"backbone": backbone}).to_dict()}, path)
    return net, path


def test_init_from_loads_the_encoder_and_leaves_the_heads_fresh(tmp_path):
    trained, path = saved_run(tmp_path)
    torch.manual_seed(2)
    fresh = DIRNet("resnet18", 5, grouped=True)
    heads = {key: value.clone() for key, value in fresh.state_dict().items() if not key.startswith("encoder.")}
    checkpoint.load_encoder(fresh, path, "resnet18")
    for key, value in trained.encoder.state_dict().items():
        assert torch.equal(fresh.encoder.state_dict()[key], value), key
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in heads.items())


def test_init_from_refuses_another_backbone_a_foreign_file_and_a_missing_one(tmp_path):
    _, path = saved_run(tmp_path)
    with pytest.raises(TrainingError, match=f"init_from={path} holds a resnet18 encoder; this run's backbone is resnet34"):
        checkpoint.encoder_weights(path, "resnet34")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": [1, 2]}, foreign)
    with pytest.raises(TrainingError, match=f"init_from={foreign} is not a groupdir checkpoint.pt"):
        checkpoint.encoder_weights(foreign, "resnet18")
    with pytest.raises(TrainingError, match="not found"):
        checkpoint.encoder_weights(tmp_path / "absent.pt", "resnet18")
