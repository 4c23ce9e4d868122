"""The training augmentation of a whole batch on the training device, for the FFCV path (whose
loader then only decodes and resizes):

    crop="pad"             the field's RandomCrop(S, padding=S/14) (FFCV's RandomTranslate): zero-pad
                           by p on each side and cut an S x S window at a uniform offset in [0, 2p]
                           on each axis; a horizontal flip with probability 1/2
    crop="random_resized"  torchvision's RandomResizedCrop(S) box (area 8-100%, aspect ratio 3/4-4/3,
                           ten tries, else the whole image) of the decoded S x S image, resampled
                           bilinearly back to S x S, and the flip, in one grid_sample

then the field's Normalize(0.5, 0.5). Every sample gets its own draw; there is no per-image Python
loop. The draws come from a CPU generator seeded with (seed, rank, epoch) and are taken in batch
order, so a restored epoch replays the same augmentation, on any device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

CROPS = ("pad", "random_resized")
SCALE = (0.08, 1.0)             # RandomResizedCrop's defaults
RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Pixels 0-255 (B, 3, H, W) -> float in [-1, 1], the field's Normalize(0.5, 0.5). A uint8
    batch is copied; a float32 one is normalised in place."""
    return images.float().div_(127.5).sub_(1.0)


def padding_for(image_size: int) -> int:
    return max(1, round(image_size / 14))  # 16 at 224 px, as the field's RandomCrop


def epoch_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """The augmentation draws of one rank's epoch: independent streams per (seed, rank, epoch)."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def augment(images: torch.Tensor, crop: str, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, S, S) on any device -> the augmented, normalised float batch on that device."""
    batch, _, height, width = images.shape
    flips = torch.rand(batch, generator=generator) < 0.5
    if crop == "pad":
        padding = padding_for(height)
        offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
        return normalize(pad_crop_flip(images, padding, offsets[0], offsets[1], flips))
    if crop == "random_resized":
        return normalize(resized_crop_flip(images, crop_boxes(batch, height, width, generator), flips))
    raise ValueError(f"unknown crop {crop!r}: use one of {', '.join(CROPS)}")


def pad_crop_flip(images: torch.Tensor, padding: int, offsets_y: torch.Tensor, offsets_x: torch.Tensor,
                  flips: torch.Tensor) -> torch.Tensor:
    """Sample b: the S x S window at (offsets_y[b], offsets_x[b]) of its zero-padded image, mirrored
    first where flips[b]. (A window of the mirrored image is the mirror of a window of the image at
    the mirrored offset: with uniform offsets that is the same distribution as crop-then-flip.)"""
    batch, channels, height, width = images.shape
    device = images.device
    flipped = flips.to(device).nonzero().squeeze(1)
    # One zero-padded buffer: the images, then mirrored copies of those to flip (mirroring only them,
    # by plain copies, measured 6x faster on the CPU than a select over a mirrored whole batch).
    padded = images.new_zeros(batch + len(flipped), channels, height + 2 * padding, width + 2 * padding)
    inner = padded[:, :, padding:padding + height, padding:padding + width]
    inner[:batch] = images
    inner[batch:] = images.index_select(0, flipped).flip(3)
    source = torch.arange(batch, device=device)
    source[flipped] = batch + torch.arange(len(flipped), device=device)
    # Every output row is one contiguous run of `width` pixels of the buffer: a view with one row per
    # start position, and one row gather (index_select) copies them all at memory speed.
    padded_height, padded_width = padded.shape[2:]
    planes = source.view(batch, 1, 1) * channels + torch.arange(channels, device=device).view(1, channels, 1)
    lines = planes * padded_height + offsets_y.to(device).view(batch, 1, 1) + torch.arange(height, device=device)
    starts = lines * padded_width + offsets_x.to(device).view(batch, 1, 1)
    flat = padded.reshape(-1)
    windows = flat.as_strided((flat.numel() - width + 1, width), (1, 1))
    return windows.index_select(0, starts.reshape(-1)).view(batch, channels, height, width)


def crop_boxes(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 4) boxes (top, left, box height, box width) in pixels, drawn as RandomResizedCrop.get_params
    draws them: TRIES candidates per sample, the first that fits, else the whole (square) image."""
    area = height * width
    target = area * torch.empty(batch, TRIES).uniform_(*SCALE, generator=generator)
    aspect = torch.exp(torch.empty(batch, TRIES).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=generator))
    box_width = torch.sqrt(target * aspect).round()
    box_height = torch.sqrt(target / aspect).round()
    fits = (box_width > 0) & (box_width <= width) & (box_height > 0) & (box_height <= height)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(1)
    box_height = torch.where(found, box_height.gather(1, first)[:, 0], float(height))
    box_width = torch.where(found, box_width.gather(1, first)[:, 0], float(width))
    # randint(0, H - h + 1) per sample: floor of a uniform draw over that many integers
    top = (torch.rand(batch, generator=generator) * (height - box_height + 1)).floor()
    left = (torch.rand(batch, generator=generator) * (width - box_width + 1)).floor()
    return torch.stack([top, left, box_height, box_width], 1)


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Each sample's box resampled bilinearly to the image's size (float, 0-255), mirrored where flips."""
    batch, _, height, width = images.shape
    top, left, box_height, box_width = boxes.T
    sign = 1.0 - 2.0 * flips.float()
    # affine_grid maps output coordinates in [-1, 1] to input ones (align_corners=False: pixel edges)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = sign * box_width / width
    theta[:, 0, 2] = (2 * left + box_width) / width - 1
    theta[:, 1, 1] = box_height / height
    theta[:, 1, 2] = (2 * top + box_height) / height - 1
    grid = F.affine_grid(theta.to(images.device), [batch, 3, height, width], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

