"""A torch Dataset over the DIR layout with the field's transforms, for small experiments.

Train: Resize(S, S) -> RandomCrop(S, padding=S/14, i.e. 16 at 224) -> HorizontalFlip (crop="pad"),
or RandomResizedCrop(S) -> HorizontalFlip (crop="random_resized").
Eval:  Resize(S, S). Images come out as uint8 (C, H, W); `normalize` maps a batch to the
field's Normalize(mean 0.5, std 0.5) on whatever device the batch is on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2


class DIRImageDataset(Dataset):
    def __init__(self, paths: list[Path], labels: np.ndarray, image_size: int, train: bool, crop: str = "pad"):
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.float64)  # exact, as in the CSV: bins and groups need it
        self.image_size = image_size
        self.resize_first = not (train and crop == "random_resized")  # that crop resizes by itself
        if not train:
            self.augment = None
        elif crop == "pad":
            self.augment = v2.Compose([v2.RandomCrop(image_size, padding=max(1, round(image_size / 14))),
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
            pixels = self.augment(pixels)
        return pixels, self.labels[index], index


def make_loader(paths, labels, image_size: int, batch_size: int, train: bool, workers: int = 0,
                seed: int = 0, crop: str = "pad", rank: int = 0, world_size: int = 1) -> DataLoader:
    """Each rank reads its slice; the order is drawn from (seed, epoch): call `set_epoch` (the sampler's)
    before each pass, so a resumed run replays the same order. Eval slices are padded with repeated
    rows to equal length (the third item of a batch, the row index, lets evaluation drop them)."""
    dataset = DIRImageDataset(paths, labels, image_size, train, crop)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      drop_last=train and len(dataset) // world_size > batch_size,
                      num_workers=workers, persistent_workers=workers > 0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], the field's Normalize(0.5, 0.5)."""
    return images.float().div_(127.5).sub_(1.0)
