"""Streaming FFCV shards into a training loop, one rank or many.

Pipelines use FFCV's own operations (torchvision transforms inside an FFCV pipeline break numba):
train = decode + resize to S x S -> pad-and-crop (RandomTranslate, padding S/14) -> horizontal flip
(crop="pad"), or decode with a random resized crop -> horizontal flip (crop="random_resized");
eval  = decode + resize to S x S. Images come out uint8 (B, 3, S, S); `normalize` runs on the device.

One shard per split: FFCV's own `distributed=True` gives each rank its slice (the process group must
exist first). K shards (K a multiple of the world size): each epoch the shards are dealt to the ranks
in an order drawn from the seed and the epoch, so a rank only reads its own files, and every rank
yields the same number of batches (a collective barrier needs that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from groupdir.data.shards import check_shards_fit, read_meta


class ShardLoader:
    """Yields (images uint8, labels float64, row numbers) batches; `epoch` picks the order.
    The images of a batch are valid until the next batch is drawn."""

    def __init__(self, shards_dir: str | Path, split: str, image_size: int, batch_size: int, train: bool,
                 seed: int = 0, workers: int = 2, rank: int = 0, world_size: int = 1, crop: str = "pad"):
        shards = read_meta(shards_dir)["shards"][split]
        self.files = [Path(shards_dir) / shard["file"] for shard in shards]
        rows = [shard["rows"] for shard in shards]
        check_shards_fit({"shards": {split: shards}}, world_size, batch_size * world_size)
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.seed, self.workers, self.rank, self.world_size = seed, workers, rank, world_size
        self.crop = crop
        self.epoch = 0
        self._loaders: dict[Path, object] = {}
        # Equal batch counts on every rank: each shard contributes as many batches as the smallest can.
        self.batches_per_file = min(rows) // batch_size if train else None

    def my_files(self, epoch: int) -> list[Path]:
        if len(self.files) == 1:
            return self.files
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        return [self.files[i] for i in order[self.rank::self.world_size]]

    def __len__(self) -> int:
        if len(self.files) == 1:
            return len(self._loader(self.files[0]))
        if self.train:
            return len(self.files) // self.world_size * self.batches_per_file
        return sum(len(self._loader(f)) for f in self.my_files(self.epoch))

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        for file in self.my_files(epoch):
            loader = self._loader(file)
            loader.next_epoch = epoch  # FFCV draws its RANDOM order from (seed, epoch): restorable
            iterator = iter(loader)
            try:
                for count, (images, labels, rows) in enumerate(iterator):
                    if len(self.files) > 1 and self.train and count == self.batches_per_file:
                        break
                    # FFCV reuses its output buffers for later batches: labels and rows are kept by
                    # callers (evaluation collects them), so they are copied; images live one step.
                    yield images, labels.clone(), rows.clone()
            finally:
                iterator.close()  # an abandoned FFCV iterator keeps its threads and buffers alive

    def _loader(self, file: Path):
        if file not in self._loaders:
            self._loaders[file] = self._build(file)
        return self._loaders[file]

    def _build(self, file: Path):
        from ffcv.fields.decoders import (CenterCropRGBImageDecoder, FloatDecoder, IntDecoder,
                                          RandomResizedCropRGBImageDecoder)
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToTensor, ToTorchImage

        size = (self.image_size, self.image_size)
        if self.train and self.crop == "random_resized":
            image = [RandomResizedCropRGBImageDecoder(size), RandomHorizontalFlip()]
        else:
            image = [CenterCropRGBImageDecoder(size, ratio=1.0)]  # faces are square crops: a plain resize
            if self.train:
                image += [RandomTranslate(padding=max(1, round(self.image_size / 14))), RandomHorizontalFlip()]
        image += [ToTensor(), ToTorchImage()]
        single = len(self.files) == 1
        return Loader(str(file), batch_size=self.batch_size, num_workers=self.workers,
                      order=OrderOption.RANDOM if self.train else OrderOption.SEQUENTIAL, seed=self.seed,
                      distributed=single and self.world_size > 1, drop_last=self.train,
                      pipelines={"image": image, "label": [FloatDecoder(), ToTensor(), Squeeze()],
                                 "row": [IntDecoder(), ToTensor(), Squeeze()]})
