"""DIR data sets: the field's CSV layout and its validation, the synthetic generator, FFCV shards,
and `open_data`, the one entry point the training loop uses for either kind of data root."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from groupdir.data.dir_format import DataError, DIRTable, read_dir_table, resolve_csv
from groupdir.data.loaders import DIRImageDataset, make_loader
from groupdir.data.shards import is_shards_dir, shard_labels
from groupdir.progress import Mode

__all__ = ["DataError", "DIRTable", "read_dir_table", "resolve_csv", "DIRImageDataset", "make_loader", "open_data",
           "split_labels", "synthetic_shards"]


def open_data(cfg, splits=("train", "val", "test"), augmented: str | None = "train", rank: int = 0,
              world_size: int = 1, device="cpu", views: int = 1) -> tuple[np.ndarray, dict]:
    """(training labels, {split: loader}) for `cfg.data`: FFCV shards (a folder with meta.json, the
    default path) or a DIR data root read with torch's DataLoader (for small experiments). The
    `augmented` split gets the training augmentation and a shuffled order. Each of `world_size` ranks
    gets its slice and its share of the global `cfg.batch_size`. Every loader yields (normalised
    float images on `device`, float64 labels, row numbers) and has `set_epoch(epoch)`. The augmented
    split yields each image `views` times, augmented anew each time (the two-view methods)."""
    batch_size = cfg.batch_size // world_size
    if is_shards_dir(cfg.data):
        from groupdir.data.ffcv_loader import ShardLoader

        loaders = {split: ShardLoader(cfg.data, split, cfg.image_size, batch_size, train=split == augmented,
                                      seed=cfg.seed, workers=max(1, cfg.loader_workers), rank=rank,
                                      world_size=world_size, crop=cfg.crop, device=device,
                                      views=views if split == augmented else 1)
                   for split in splits}
        return shard_labels(cfg.data, "train"), loaders
    table = read_dir_table(cfg.data, cfg.dataset, cfg.csv)
    loaders = {split: make_loader(table.paths[split], table.labels[split], cfg.image_size, batch_size,
                                  train=split == augmented, workers=cfg.loader_workers, seed=cfg.seed,
                                  crop=cfg.crop, rank=rank, world_size=world_size, device=device,
                                  views=views if split == augmented else 1)
               for split in splits}
    return table.labels["train"], loaders


def train_labels(cfg) -> np.ndarray:
    """The training labels alone (the driver checks the grouping with them before any worker starts)."""
    return split_labels(cfg, "train")


def split_labels(cfg, split: str) -> np.ndarray:
    """A split's labels alone, without opening its images."""
    if is_shards_dir(cfg.data):
        return shard_labels(cfg.data, split)
    return read_dir_table(cfg.data, cfg.dataset, cfg.csv, check_images=False).labels[split]


def synthetic_shards(out: Path, train_size: int = 4000, spec=None, encoding=None, name: str = "shards",
                     workers: int = -1, progress: Mode = "off") -> Path:
    """A synthetic face-age set in out/data and its FFCV shards in out/NAME, each written only if
    missing: the embedded default's data (the demo, a sweep without --data, the benchmarks) by
    default (seed 0, 64 px), or those of `spec` (data.synth.SynthSpec) and `encoding`
    (data.shards.Encoding). `progress` shows the writing and encoding."""
    from groupdir.data.shards import Encoding, prepare
    from groupdir.data.synth import SynthSpec, write_synth

    data, shards = Path(out) / "data", Path(out) / name
    if (data / "synth_age.csv").is_file():
        print(f"using the synthetic data set already in {data}", flush=True)
    else:
        print(f"writing a synthetic face-age data set to {data} ...", flush=True)
        write_synth(data, spec or SynthSpec(train=train_size, seed=0), force=True, progress=progress)
    if not is_shards_dir(shards):
        print(f"encoding it into FFCV shards in {shards} ...", flush=True)
        prepare(data, shards, encoding=encoding or Encoding(max_resolution=64), workers=workers, force=True,
                progress=progress)
    return shards
