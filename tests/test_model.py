import pytest
import torch

from groupdir.model import DIRNet


def test_shapes_for_group_dir_and_vanilla():
    images = torch.randn(3, 3, 32, 32)
    grouped = DIRNet("resnet18", num_groups=7)(images)
    assert grouped.features.shape == (3, 512) and grouped.group_logits.shape == (3, 7)
    assert grouped.experts.shape == (3, 7)
    vanilla = DIRNet("resnet18", grouped=False)(images)
    assert vanilla.group_logits is None and vanilla.experts.shape == (3, 1)


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="unknown backbone"):
        DIRNet("vit_b_16")
