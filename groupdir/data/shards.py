"""FFCV shards: a validated DIR data set encoded once (`groupdir prepare`), then streamed by FFCV.

Layout of SHARDS/:
  train.beton, val.beton, test.beton          (one shard per split), or
  train-00000-of-00004.beton ...              (--num-shards 4)
  labels-train.npy, labels-val.npy, ...       every split's labels in shard order, float64, exact
  meta.json                                   provenance, counts, histogram, shots, encoding, shards

Each sample holds the image (RGBImageField), the label (FloatField, float64 as in the CSV) and its
row number inside the split. Everything is written into a temporary folder beside SHARDS that is
renamed when complete, so an interrupted prepare leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from groupdir import __version__
from groupdir.atomic import atomic_folder, check_writable
from groupdir.config import WRITE_MODES
from groupdir.data.dir_format import SPLITS, DIRTable, read_dir_table
from groupdir.errors import ConfigError, DataError
from groupdir.labels import FEW_SHOT, MANY_SHOT, label_bins, shot_of_bins
from groupdir.progress import Mode, Progress

META = "meta.json"


@dataclass
class Encoding:
    max_resolution: int = 256     # longest side kept, in pixels
    jpeg_quality: int = 90
    write_mode: str = "smart"     # jpg | raw | smart | proportion (FFCV's RGBImageField modes)
    compress_probability: float = 0.5  # for write_mode=proportion


def shard_names(split: str, num_shards: int) -> list[str]:
    if num_shards == 1:
        return [f"{split}.beton"]
    return [f"{split}-{k:05d}-of-{num_shards:05d}.beton" for k in range(num_shards)]


def prepare(root: str | Path, out: str | Path, dataset: str = "auto", csv: str = "",
            encoding: Encoding | None = None, workers: int = -1, num_shards: int = 1, force: bool = False,
            skip_bad: bool = False, label_bin_width: float = 1.0, many_shot: int = MANY_SHOT,
            few_shot: int = FEW_SHOT, progress: Mode = "off") -> dict:
    """Validate every row of a DIR data root, encode it into FFCV shards at `out`; return meta.json.
    `progress` shows both phases: the rows validated, then the images encoded over every split."""
    encoding = encoding or Encoding()
    out = Path(out).resolve()
    if encoding.write_mode not in WRITE_MODES:
        raise ConfigError(f"write mode {encoding.write_mode!r} is not one of {', '.join(WRITE_MODES)}")
    if num_shards < 1:
        raise ConfigError(f"--num-shards {num_shards} must be >= 1")
    check_writable(out, atomically=True)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    table = read_dir_table(root, dataset, csv, skip_bad=skip_bad, progress=progress)
    for split in SPLITS:
        if table.size(split) < num_shards:
            raise DataError(f"{table.csv}: split {split!r} has {table.size(split)} rows, fewer than "
                            f"--num-shards {num_shards}")

    with atomic_folder(out) as tmp:
        images = sum(map(table.size, SPLITS))
        with Progress(images, "images encoded", progress) as encoded, _ffcv_counts_into(encoded):
            shards = {split: _write_split(table, split, tmp, encoding, workers, num_shards) for split in SPLITS}
        meta = _meta(table, encoding, shards, label_bin_width, many_shot, few_shot)
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return meta


@contextmanager
def _ffcv_counts_into(encoded: Progress):
    """FFCV's DatasetWriter (ffcv 1.0.2) draws a tqdm bar of its own per shard, unlabelled, with no
    switch to turn it off. While shards are written, the `tqdm` it looks up at each write is a stand-in
    that counts into `encoded`: one display over every split that follows the mode (silent when off,
    no carriage returns in lines). The swap is process-wide: two prepares in threads of one process
    would count into each other's display."""
    import ffcv.writer

    drawn = ffcv.writer.tqdm
    ffcv.writer.tqdm = lambda total: SimpleNamespace(update=encoded.update, close=lambda: None)
    try:
        yield
    finally:
        ffcv.writer.tqdm = drawn


class _SplitRows:
    """What FFCV's writer indexes: (uint8 HxWx3 image, float64 label, row number in the split)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, rows: np.ndarray):
        self.paths, self.labels, self.rows = paths, labels, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        with Image.open(self.paths[row]) as image:
            pixels = np.asarray(image.convert("RGB"))  # grayscale and palette images become RGB
        return pixels, float(self.labels[row]), row


def _write_split(table: DIRTable, split: str, folder: Path, encoding: Encoding, workers: int,
                 num_shards: int) -> list[dict]:
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    labels = table.labels[split]
    # Rows are dealt to shards round-robin, so every shard spans the whole label range even when
    # the CSV is sorted by label.
    shards = []
    order = []
    for k, name in enumerate(shard_names(split, num_shards)):
        rows = np.arange(k, len(labels), num_shards)
        fields = {"image": RGBImageField(write_mode=encoding.write_mode, max_resolution=encoding.max_resolution,
                                         jpeg_quality=encoding.jpeg_quality,
                                         compress_probability=encoding.compress_probability),
                  "label": FloatField(), "row": IntField()}
        writer = DatasetWriter(str(folder / name), fields, num_workers=workers)
        writer.from_indexed_dataset(_SplitRows(table.paths[split], labels, rows))
        shards.append({"file": name, "rows": len(rows)})
        order.append(rows)
    np.save(folder / f"labels-{split}.npy", labels[np.concatenate(order)])
    return shards


def _meta(table: DIRTable, encoding: Encoding, shards: dict, bin_width: float, many: int, few: int) -> dict:
    train = table.labels["train"]
    bins, counts = np.unique(label_bins(train, bin_width), return_counts=True)
    shots = shot_of_bins(bins, train, many, few, bin_width)
    every = np.concatenate([table.labels[s] for s in SPLITS])
    return {
        "dataset": table.csv.stem,
        "groupdir_version": __version__,
        "source_csv": str(table.csv),
        "source_csv_sha256": hashlib.sha256(table.csv.read_bytes()).hexdigest(),
        "rows": {s: table.size(s) for s in SPLITS},
        "label_bin_width": bin_width,
        "train_label_histogram": {f"{b * bin_width:g}": int(c) for b, c in zip(bins, counts)},
        "label_range": [float(every.min()), float(every.max())],
        "shots": {"many_shot": many, "few_shot": few,
                  "per_bin": {f"{b * bin_width:g}": str(s) for b, s in zip(bins, shots)}},
        "encoding": asdict(encoding),
        "shards": shards,
        "skipped": table.skipped,
    }


def read_meta(shards_dir: str | Path) -> dict:
    return json.loads((Path(shards_dir) / META).read_text())


def is_shards_dir(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def shard_labels(shards_dir: str | Path, split: str) -> np.ndarray:
    return np.load(Path(shards_dir) / f"labels-{split}.npy")


def check_shards_fit(meta: dict, workers: int, batch_size: int) -> None:
    """Every worker gets whole shards of each split (a split in one shard is read by row ranges),
    and each train shard holds a full per-worker batch."""
    for split, shards in meta["shards"].items():
        if len(shards) > 1 and len(shards) % workers:
            raise ConfigError(f"{len(shards)} shards of split {split!r} cannot be shared by workers={workers}; "
                              f"prepare with --num-shards a multiple of the worker count")
        smallest = min(shard["rows"] for shard in shards)
        if split == "train" and len(shards) > 1 and smallest < batch_size // workers:
            raise ConfigError(f"a train shard of {smallest} rows holds no full batch of {batch_size // workers} "
                              f"per worker; prepare fewer shards")
