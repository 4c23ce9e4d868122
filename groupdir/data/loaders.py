"""A torch Dataset over the DIR layout with the field's transforms, for small experiments.

Train: Resize(S, S) -> RandomCrop(S, padding=S/14, i.e. 16 at 224) -> HorizontalFlip (crop="pad"),
or RandomResizedCrop(S) -> HorizontalFlip (crop="random_resized").
Eval:  Resize(S, S). The workers' uint8 batches are moved to the training device and normalised
there (Normalize(mean 0.5, std 0.5)), so both loaders deliver the same thing: float (B, 3, S, S)
on the device. This path keeps torchvision's own per-image transforms, the reference the FFCV
path's batched augmentation (groupdir/data/augment.py) is tested against. With `views` = V > 1 each
image is decoded once and augmented V times; a batch is (V*B, 3, S, S), sample i + kB the k-th
view of image i, labels and rows repeated alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from groupdir.data.augment import normalize, padding_for


class DIRImageDataset(Dataset):
    def __init__(self, paths: list[Path], labels: np.ndarray, image_size: int, train: bool, crop: str = "pad",
                 views: int = 1):
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.float64)  # exact, as in the CSV: bins and groups need it
        self.image_size, self.views = image_size, views
        self.resize_first = not (train and crop == "random_resized")  # that crop resizes by itself
        if not train:
            self.augment = None
        elif crop == "pad":
            self.augment = v2.Compose([v2.RandomCrop(image_size, padding=padding_for(image_size)),
                                       v2.RandomHorizontalFlip()])
        else:
            self.augment = v2.Compose([v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            # Grayscale and palette images become RGB; the resize is the field's square Resize(S, S).
            image = image.convert("RGB")
            if self.resize_first:
                image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        if self.augment is not None:
            pixels = torch.stack([self.augment(pixels) for _ in range(self.views)]) if self.views > 1 else self.augment(pixels)
        return pixels, self.labels[index], index


class DeviceBatches:
    """A DataLoader's uint8 batches, normalised on `device`; `set_epoch` draws that epoch's order."""

    def __init__(self, loader: DataLoader, device: torch.device | str = "cpu"):
        self.loader, self.device = loader, torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.sampler.set_epoch(epoch)

    def __iter__(self):
        for images, labels, rows in self.loader:
            views = images.shape[1] if images.dim() == 5 else 1
            if views > 1:  # (B, V, 3, S, S): view k of every image, then view k + 1
                images = images.transpose(0, 1).flatten(0, 1)
                labels, rows = labels.repeat(views), rows.repeat(views)
            yield normalize(images.to(self.device, non_blocking=True)), labels, rows


def make_loader(paths, labels, image_size: int, batch_size: int, train: bool, workers: int = 0,
                seed: int = 0, crop: str = "pad", rank: int = 0, world_size: int = 1,
                device: torch.device | str = "cpu", views: int = 1) -> DeviceBatches:
    """Each rank reads its slice; the order is drawn from (seed, epoch): call `set_epoch` before each
    pass, so a resumed run replays the same order. Eval slices are padded with repeated rows to
    equal length (the third item of a batch, the row index, lets evaluation drop them)."""
    dataset = DIRImageDataset(paths, labels, image_size, train, crop, views if train else 1)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed)
    return DeviceBatches(DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                    drop_last=train and len(dataset) // world_size > batch_size,
                                    num_workers=workers, persistent_workers=workers > 0,
                                    pin_memory=torch.device(device).type == "cuda"), device)
