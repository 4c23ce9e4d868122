import pytest
import torch

from groupdir.model import DIRNet, Output, route


def test_shapes_for_group_dir_and_vanilla():
    images = torch.randn(3, 3, 32, 32)
    grouped = DIRNet("resnet18", num_groups=7)(images)
    assert grouped.features.shape == (3, 512) and grouped.group_logits.shape == (3, 7)
    assert grouped.experts.shape == (3, 7)
    vanilla = DIRNet("resnet18", grouped=False)(images)
    assert vanilla.group_logits is None and vanilla.experts.shape == (3, 1)


def test_routes_pick_the_right_expert():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    experts = torch.tensor([[10.0, 20.0, 30.0], [11.0, 21.0, 31.0]])
    output = Output(torch.zeros(2, 4), logits, experts)
    assert route(output, "predicted").tolist() == [10.0, 31.0]
    assert route(output, "oracle", torch.tensor([1, 1])).tolist() == [20.0, 21.0]
    probs = logits.softmax(1)
    torch.testing.assert_close(route(output, "soft"), (probs * experts).sum(1))
    with pytest.raises(ValueError, match="needs the true groups"):
        route(output, "oracle")


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="unknown backbone"):
        DIRNet("vit_b_16")
