"""Streaming FFCV shards into a training loop, one rank or many.

FFCV's threads only decode and resize (to S x S: faces are square crops). The training augmentation
(pad-and-crop or random resized crop, flip) and the normalisation run on the whole batch on the
training device (groupdir/data/augment.py), a few batched tensor ops, where FFCV's own per-image
RandomTranslate and flip halved the loader's throughput on a 2-core CPU. Batches come out as float
(B, 3, S, S) on that device, as the DataLoader path's do. With `views` = V > 1 (the two-view
contrastive methods) each decoded batch is augmented V times: (V*B, 3, S, S), sample i + kB the
k-th view of image i, labels and rows repeated alike, at no second decode.

One shard per split: FFCV's own `distributed=True` gives each rank its slice (the process group must
exist first). K shards (K a multiple of the world size): each epoch the shards are dealt to the ranks
in an order drawn from the seed and the epoch, so a rank only reads its own files, and every rank
yields the same number of batches (a collective barrier needs that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import torch

from groupdir.data.augment import augment, epoch_generator, normalize
from groupdir.data.shards import check_shards_fit, read_meta


class ShardLoader:
    """Yields (images float on `device`, labels float64, row numbers) batches; `set_epoch` picks the
    order and, for training, the augmentation."""

    def __init__(self, shards_dir: str | Path, split: str, image_size: int, batch_size: int, train: bool,
                 seed: int = 0, workers: int = 2, rank: int = 0, world_size: int = 1, crop: str = "pad",
                 device: torch.device | str = "cpu", views: int = 1):
        shards = read_meta(shards_dir)["shards"][split]
        self.files = [Path(shards_dir) / shard["file"] for shard in shards]
        rows = [shard["rows"] for shard in shards]
        check_shards_fit({"shards": {split: shards}}, world_size, batch_size * world_size)
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.seed, self.workers, self.rank, self.world_size = seed, workers, rank, world_size
        self.crop, self.device, self.views = crop, torch.device(device), views
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

    def set_epoch(self, epoch: int) -> None:
        """The next pass draws epoch `epoch`'s order and augmentation (a restored run replays it)."""
        self.epoch = epoch

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        draws = epoch_generator(self.seed, self.rank, epoch) if self.train else None
        for file in self.my_files(epoch):
            loader = self._loader(file)
            loader.next_epoch = epoch  # FFCV draws its RANDOM order from (seed, epoch): restorable
            iterator = iter(loader)
            try:
                for count, (images, labels, rows) in enumerate(iterator):
                    if len(self.files) > 1 and self.train and count == self.batches_per_file:
                        break
                    # FFCV reuses its output buffers for later batches: labels and rows are kept by
                    # callers (evaluation collects them), so they are copied; the images are new tensors.
                    images = images.to(self.device, non_blocking=True)
                    if not self.train:
                        yield normalize(images), labels.clone(), rows.clone()
                        continue
                    views = [augment(images, self.crop, draws) for _ in range(self.views)]
                    yield torch.cat(views), labels.repeat(self.views), rows.repeat(self.views)
            finally:
                iterator.close()  # an abandoned FFCV iterator keeps its threads and buffers alive

    def _loader(self, file: Path):
        if file not in self._loaders:
            self._loaders[file] = self._build(file)
        return self._loaders[file]

    def _build(self, file: Path):
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, FloatDecoder, IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

        size = (self.image_size, self.image_size)
        # ratio=1 on square faces: a plain resize
        image = [CenterCropRGBImageDecoder(size, ratio=1.0), ToTensor(), ToTorchImage()]
        single = len(self.files) == 1
        return Loader(str(file), batch_size=self.batch_size, num_workers=self.workers,
                      order=OrderOption.RANDOM if self.train else OrderOption.SEQUENTIAL, seed=self.seed,
                      distributed=single and self.world_size > 1, drop_last=self.train,
                      pipelines={"image": image, "label": [FloatDecoder(), ToTensor(), Squeeze()],
                                 "row": [IntDecoder(), ToTensor(), Squeeze()]})
