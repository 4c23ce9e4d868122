"""The batched device augmentation against torchvision's per-image transforms (the DataLoader path's):
the same crops and flips, the same distribution, labels kept with their images, replayable."""

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from groupdir.data.augment import (augment, crop_boxes, epoch_generator, normalize, pad_crop_flip, padding_for,
                                   resized_crop_flip)

SIZE = 28  # padding 2: offsets 0..4 on each axis


def coordinate_images(count: int) -> torch.Tensor:
    """Channel 1 holds each pixel's row + 1, channel 2 its column + 1 (0 is padding)."""
    grid = torch.arange(1, SIZE + 1, dtype=torch.uint8)
    image = torch.stack([torch.full((SIZE, SIZE), 7, dtype=torch.uint8), grid[:, None].expand(SIZE, SIZE),
                         grid[None, :].expand(SIZE, SIZE)])
    return image.expand(count, 3, SIZE, SIZE).contiguous()


def shift_and_flip(images: torch.Tensor) -> np.ndarray:
    """Per image: (source row - output row, source column - output column, flipped) at the centre."""
    centre = SIZE // 2
    rows, cols = images[:, 1].long(), images[:, 2].long()
    flipped = cols[:, centre, centre + 1] < cols[:, centre, centre]
    return np.stack([(rows[:, centre, centre] - 1 - centre).numpy(), (cols[:, centre, centre] - 1 - centre).numpy(),
                     flipped.numpy()], 1)


def test_pad_crop_flip_equals_cropping_each_image_by_hand():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    padding = padding_for(SIZE)
    offsets_y, offsets_x = torch.randint(0, 2 * padding + 1, (2, 9), generator=generator)
    flips = torch.rand(9, generator=generator) < 0.5
    out = pad_crop_flip(images, padding, offsets_y, offsets_x, flips)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    for i in range(9):
        source = padded[i].flip(2) if flips[i] else padded[i]
        expected = source[:, offsets_y[i]:offsets_y[i] + SIZE, offsets_x[i]:offsets_x[i] + SIZE]
        assert torch.equal(out[i], expected), i


def test_pad_crop_flip_draws_the_same_distribution_as_torchvision():
    count = 4000
    torch.manual_seed(0)
    reference = v2.Compose([v2.RandomCrop(SIZE, padding=padding_for(SIZE)), v2.RandomHorizontalFlip()])
    one = coordinate_images(1)[0]
    theirs = shift_and_flip(torch.stack([reference(one) for _ in range(count)]))
    ours = augment(coordinate_images(count), "pad", torch.Generator().manual_seed(0))
    ours = shift_and_flip(((ours + 1) * 127.5).round().to(torch.uint8))
    padding = padding_for(SIZE)
    for column, values in ((0, range(-padding, padding + 1)), (1, range(-padding, padding + 1)), (2, (0, 1))):
        for value in values:  # each shift and the flip rate: frequencies within 3 binomial SEs
            p_ours, p_theirs = (float(np.mean(x[:, column] == value)) for x in (ours, theirs))
            assert abs(p_ours - p_theirs) < 3 * math.sqrt(2 * 0.25 / count), (column, value, p_ours, p_theirs)
    assert set(np.unique(ours[:, 0])) == set(range(-padding, padding + 1))


def test_crop_boxes_follow_random_resized_crop():
    count, size = 4000, 64
    torch.manual_seed(1)
    image = torch.zeros(3, size, size)
    theirs = np.array([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(count)],
                      float)
    ours = crop_boxes(count, size, size, torch.Generator().manual_seed(1)).numpy()
    for boxes in (ours, theirs):
        assert (boxes[:, 0] + boxes[:, 2] <= size).all() and (boxes[:, 1] + boxes[:, 3] <= size).all()
        assert (boxes >= 0).all() and (boxes[:, 2:] >= 1).all()

    def summary(boxes):
        area = boxes[:, 2] * boxes[:, 3] / size**2
        aspect = np.log(boxes[:, 3] / boxes[:, 2])
        top = boxes[:, 0] / np.maximum(size - boxes[:, 2], 1)
        return np.array([area.mean(), area.std(), aspect.mean(), aspect.std(), top.mean()])

    np.testing.assert_allclose(summary(ours), summary(theirs), atol=0.03)


def test_resized_crop_of_the_whole_image_is_the_image_and_its_mirror():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    out = resized_crop_flip(images, whole, torch.tensor([False, True]))
    torch.testing.assert_close(out[0], images[0].float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], images[1].float().flip(2), atol=1e-3, rtol=0)
    left_half = resized_crop_flip(images[:1], torch.tensor([[0.0, 0.0, 16.0, 8.0]]), torch.tensor([False]))
    # box width 8 stretched to 16: every other output column is a source column, half-way columns blend
    assert left_half[0, :, :, 0].sub(images[0, :, :, 0].float()).abs().max() < 1e-4


@pytest.mark.parametrize("crop", ["pad", "random_resized"])
def test_each_sample_keeps_its_own_pixels(crop):
    """Image k is constant k: after augmentation it still holds only k (or padding), so a label stays
    with its image."""
    count = 64
    images = torch.arange(count, dtype=torch.uint8)[:, None, None, None].expand(count, 3, SIZE, SIZE).contiguous()
    out = augment(images, crop, torch.Generator().manual_seed(3))
    expected = normalize(torch.arange(count, dtype=torch.uint8))[:, None, None, None]
    assert out.dtype == torch.float32 and out.shape == images.shape
    close = (out - expected).abs() < 1e-5
    assert (close | (out == -1.0)).all()
    assert close.flatten(1).float().mean(1).min() > 0.5


def test_a_seed_replays_and_epochs_and_ranks_differ():
    images = torch.randint(0, 256, (32, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    for crop in ("pad", "random_resized"):
        first = augment(images, crop, epoch_generator(seed=5, rank=0, epoch=2))
        assert torch.equal(first, augment(images, crop, epoch_generator(seed=5, rank=0, epoch=2)))
        assert not torch.equal(first, augment(images, crop, epoch_generator(seed=5, rank=0, epoch=3)))
        assert not torch.equal(first, augment(images, crop, epoch_generator(seed=5, rank=1, epoch=2)))
