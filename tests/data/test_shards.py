import json
from pathlib import Path
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from groupdir.data import DataError, read_dir_table
from helpers import TRAIN_ROWS
from groupdir.data.ffcv_loader import ShardLoader
from groupdir.data.shards import Encoding, prepare, read_meta, shard_labels

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def shards(tiny_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "synth"
    prepare(tiny_synth, out, encoding=Encoding(max_resolution=32), workers=1)
    return out


def read_all(shards_dir, split, **kwargs):
    loader = ShardLoader(shards_dir, split, image_size=16, batch_size=50, train=False, workers=1, **kwargs)
    images, labels, rows = [], [], []
    for batch_images, batch_labels, batch_rows in loader:
        images.append(batch_images.shape)
        labels.append(batch_labels.numpy())
        rows.append(batch_rows.numpy())
    return images, np.concatenate(labels), np.concatenate(rows)


def test_round_trip_labels_shapes_counts_and_histogram(tiny_synth, shards):
    table = read_dir_table(tiny_synth)
    meta = read_meta(shards)
    for split in SPLITS:
        shapes, labels, rows = read_all(shards, split)
        assert meta["rows"][split] == table.size(split) == len(labels)
        assert sorted(rows.tolist()) == list(range(table.size(split)))  # every row exactly once
        np.testing.assert_array_equal(labels, table.labels[split][rows])  # float64, exactly the CSV's
        assert labels.dtype == np.float64
        assert all(shape[1:] == (3, 16, 16) for shape in shapes)
        assert sorted(shard_labels(shards, split).tolist()) == sorted(table.labels[split].tolist())
    recount = {}
    for label in table.labels["train"]:
        recount[f"{int(label)}"] = recount.get(f"{int(label)}", 0) + 1
    assert meta["train_label_histogram"] == recount
    assert meta["source_csv_sha256"] and meta["encoding"]["max_resolution"] == 32
    assert set(meta["shots"]["per_bin"].values()) <= {"many", "median", "few"}


def read_rows(loader):
    for _, _, rows in loader:
        yield from rows.tolist()


def test_restored_epoch_counter_gives_that_epochs_order(shards):
    loader = ShardLoader(shards, "train", 16, 50, train=True, seed=1, workers=1)
    orders = [list(read_rows(loader)) for _ in range(3)]
    assert orders[0] != orders[1]
    resumed = ShardLoader(shards, "train", 16, 50, train=True, seed=1, workers=1)
    resumed.set_epoch(2)
    assert list(read_rows(resumed)) == orders[2]


def test_augmented_batches_hold_their_rows_images_and_a_restored_epoch_replays_them(shards):
    """Each training image is a pad-crop (and maybe mirror) of its own row's image; a fresh loader
    set to epoch 1 yields epoch 1's images exactly."""
    from groupdir.data.augment import padding_for

    plain = ShardLoader(shards, "train", 16, 50, train=False, workers=1)
    by_row = {int(row): image for images, _, rows in plain for image, row in zip(images, rows)}
    loader = ShardLoader(shards, "train", 16, 50, train=True, seed=3, workers=1)
    epochs = [[(images.clone(), rows) for images, _, rows in loader] for _ in range(2)]
    padding, inner = padding_for(16), slice(padding_for(16), 16 - padding_for(16))
    for images, rows in epochs[0]:
        assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
        for image, row in zip(images, rows):
            source = by_row[int(row)]
            # the inner part of the crop is a window of the source at a shift of at most `padding`
            assert any(torch.equal(candidate[:, inner, inner],
                                   torch.roll(source, (dy, dx), (1, 2))[:, inner, inner])
                       for candidate in (image, image.flip(2))
                       for dy in range(-padding, padding + 1) for dx in range(-padding, padding + 1))
    resumed = ShardLoader(shards, "train", 16, 50, train=True, seed=3, workers=1)
    resumed.set_epoch(1)
    replay = [(images, rows) for images, _, rows in resumed]
    assert all(torch.equal(a, b) and torch.equal(r, q) for (a, r), (b, q) in zip(epochs[1], replay))
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])


def small_root(tmp_path):
    (tmp_path / "img").mkdir(parents=True)
    rows = ["age,path,split"]
    for i, split in enumerate(["train", "train", "val", "test"]):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(tmp_path / f"img/{i}.jpg")
        rows.append(f"{20 + i},img/{i}.jpg,{split}")
    (tmp_path / "agedb.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.mark.parametrize("breakage, message", [
    (lambda root: (root / "img/1.jpg").write_bytes(b"garbage"), "image cannot be decoded"),
    (lambda root: (root / "img/1.jpg").write_bytes((root / "img/1.jpg").read_bytes()[:300]), "image cannot be decoded"),
    (lambda root: (root / "img/1.jpg").unlink(), "image file is missing"),
    (lambda root: (root / "agedb.csv").write_text("age,path\n20,img/0.jpg\n"), "missing column"),
    (lambda root: (root / "agedb.csv").write_text("age,path,split\nnan,img/0.jpg,train\n"), "not a finite number"),
    (lambda root: (root / "agedb.csv").write_text("age,path,split\n-3,img/0.jpg,train\n"), "is negative"),
    (lambda root: (root / "agedb.csv").write_text("age,path,split\n3,img/0.jpg,dev\n"), "not one of train"),
])
def test_bad_input_gives_its_error_and_no_output(tmp_path, breakage, message):
    root = small_root(tmp_path / "root")
    breakage(root)
    with pytest.raises(DataError, match=message):
        prepare(root, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_needs_force_and_skip_bad_lists_rows(tmp_path):
    root = small_root(tmp_path / "root")
    # A grayscale image and a non-ASCII file name are fine; a corrupt one is skipped on request.
    Image.fromarray(np.full((30, 30), 99, np.uint8), mode="L").save(root / "img/ägé_0.jpg")
    (root / "img/1.jpg").write_bytes(b"garbage")
    csv = (root / "agedb.csv").read_text().replace("img/0.jpg", "img/ägé_0.jpg")
    (root / "agedb.csv").write_text(csv + "21,img/0.jpg,train\n")
    meta = prepare(root, tmp_path / "out", workers=1, skip_bad=True)
    assert meta["rows"]["train"] == 2
    assert meta["skipped"] == [{"line": 3, "path": "img/1.jpg", "reason": meta["skipped"][0]["reason"]}]
    assert "cannot be decoded" in meta["skipped"][0]["reason"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["skipped"] == meta["skipped"]
    with pytest.raises(FileExistsError, match="--force"):
        prepare(root, tmp_path / "out", workers=1, skip_bad=True)
    prepare(root, tmp_path / "out", workers=1, skip_bad=True, force=True)


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_shards_folder(tiny_synth, tmp_path):
    out = tmp_path / "killed"
    script = ("import sys; from groupdir.data.shards import prepare, Encoding; "
              f"prepare({str(tiny_synth)!r}, {str(out)!r}, encoding=Encoding(write_mode='raw'), workers=1)")
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not list(tmp_path.glob(".killed.tmp-*/*.beton")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)  # wait until it is writing shards
    writing = bool(list(tmp_path.glob(".killed.tmp-*/*.beton")))
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and writing, "prepare was not killed while it wrote shards"
    assert not out.exists()
    # The next prepare clears what the killed one left and completes.
    prepare(tiny_synth, out, encoding=Encoding(max_resolution=32), workers=1)
    assert out.exists() and not list(tmp_path.glob(".killed.tmp-*"))


def _ddp_rank(rank: int, world_size: int, store: str, shards_dir: str, result: str) -> None:
    """One DDP rank (gloo on the CPU): the rows it is given for epochs 0 and 1, and epoch 1 again
    from a fresh loader whose epoch counter was restored."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        def rows_of(loader):
            return [int(r) for _, _, rows in loader for r in rows]

        loader = ShardLoader(shards_dir, "train", 16, 16, train=True, seed=5, workers=1, rank=rank,
                             world_size=world_size)
        epochs = [rows_of(loader), rows_of(loader)]
        restored = ShardLoader(shards_dir, "train", 16, 16, train=True, seed=5, workers=1, rank=rank,
                               world_size=world_size)
        restored.set_epoch(1)
        val = ShardLoader(shards_dir, "val", 16, 50, train=False, workers=1, rank=rank, world_size=world_size)
        Path(result).write_text(json.dumps({"epochs": epochs, "restored": rows_of(restored), "val": rows_of(val)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_ranks_get_disjoint_rows_covering_the_split(tiny_synth, tmp_path):
    """With one shard and with four: one pair of rank processes reads both (a process start and
    FFCV's compilation cost more than the reading)."""
    import torch.multiprocessing as mp

    layouts = {}
    for num_shards in (1, 4):
        shards_dir = tmp_path / f"shards-{num_shards}"
        meta = prepare(tiny_synth, shards_dir, encoding=Encoding(max_resolution=32), workers=1, num_shards=num_shards)
        assert meta["shards"]["train"][0]["file"] == ("train.beton" if num_shards == 1 else "train-00000-of-00004.beton")
        assert sum(shard["rows"] for shard in meta["shards"]["train"]) == TRAIN_ROWS
        layouts[num_shards] = (meta, str(shards_dir), [str(tmp_path / f"rank{r}-{num_shards}.json") for r in (0, 1)])
    mp.spawn(_run_rank, args=(str(tmp_path / "store"), [(folder, results) for _, folder, results in layouts.values()]),
             nprocs=2)
    for num_shards, (meta, _, results) in layouts.items():
        ranks = [json.loads(Path(p).read_text()) for p in results]
        rows = meta["rows"]["train"]
        for epoch in (0, 1):
            mine, theirs = (set(r["epochs"][epoch]) for r in ranks)
            assert len(ranks[0]["epochs"][epoch]) == len(ranks[1]["epochs"][epoch])  # same number of batches
            assert not mine & theirs
            # drop_last leaves out fewer than one batch per rank (per shard with K shards)
            assert rows - len(mine | theirs) < 16 * max(2, num_shards), num_shards
        assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # a new order each epoch
        for rank in ranks:
            assert rank["restored"] == rank["epochs"][1]  # a restored epoch counter replays that epoch
        # Evaluation: every validation row exactly once across the ranks (no drop_last).
        assert not set(ranks[0]["val"]) & set(ranks[1]["val"])
        assert set(ranks[0]["val"]) | set(ranks[1]["val"]) == set(range(meta["rows"]["val"]))


def _run_rank(rank, store, layouts):
    for index, (shards_dir, results) in enumerate(layouts):
        _ddp_rank(rank, 2, f"{store}-{index}", shards_dir, results[rank])


def test_random_resized_crop_in_both_loaders(tiny_synth, shards):
    from groupdir.data.loaders import make_loader

    ffcv = ShardLoader(shards, "train", 16, 50, train=True, workers=1, crop="random_resized")
    images, labels, _ = next(iter(ffcv))
    assert images.shape == (50, 3, 16, 16) and labels.dtype.is_floating_point
    table = read_dir_table(tiny_synth)
    torch_loader = make_loader(table.paths["train"], table.labels["train"], 16, 50, train=True, crop="random_resized")
    assert next(iter(torch_loader))[0].shape == (50, 3, 16, 16)


def test_two_views_augment_one_decoded_batch_twice_in_both_loaders(tiny_synth, shards):
    """views=2: sample i + B is a second augmentation of image i (labels and rows repeated); the
    first view is exactly what the one-view loader yields, so nothing is decoded twice."""
    from groupdir.data.loaders import make_loader

    single = next(iter(ShardLoader(shards, "train", 16, 25, train=True, seed=2, workers=1)))
    images, labels, rows = next(iter(ShardLoader(shards, "train", 16, 25, train=True, seed=2, workers=1, views=2)))
    assert images.shape == (50, 3, 16, 16)
    assert torch.equal(images[:25], single[0]) and torch.equal(rows[:25], single[2])
    assert torch.equal(labels[25:], labels[:25]) and torch.equal(rows[25:], rows[:25])
    assert not torch.equal(images[25:], images[:25])  # augmented anew
    table = read_dir_table(tiny_synth)
    images, labels, rows = next(iter(make_loader(table.paths["train"], table.labels["train"], 16, 25, train=True,
                                                 views=2)))
    assert images.shape == (50, 3, 16, 16) and torch.equal(labels[25:], labels[:25])
    assert torch.equal(rows[25:], rows[:25]) and not torch.equal(images[25:], images[:25])
    val = make_loader(table.paths["val"], table.labels["val"], 16, 25, train=False, views=2)
    assert next(iter(val))[0].shape[0] <= 25  # evaluation is never doubled


def test_breaking_out_early_leaves_no_threads_behind(shards):
    import gc
    import threading

    loader = ShardLoader(shards, "train", 16, 20, train=True, workers=1)
    for _ in loader:  # compile and warm up once
        pass
    before = threading.active_count()
    for _ in range(3):
        for count, _ in enumerate(loader):
            if count == 2:
                break
    gc.collect()
    deadline = time.time() + 10
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= before


def test_unknown_write_mode_is_refused_before_anything_is_written(tiny_synth, tmp_path):
    from groupdir.errors import ConfigError

    with pytest.raises(ConfigError, match="write mode 'png' is not one of"):
        prepare(tiny_synth, tmp_path / "out", encoding=Encoding(write_mode="png"))
    assert not (tmp_path / "out").exists()


def test_prepare_shows_both_phases_as_plain_lines_and_hides_ffcvs_own_bar(tmp_path, capsys):
    root = small_root(tmp_path / "root")
    prepare(root, tmp_path / "out", workers=1, progress="lines")
    err = capsys.readouterr().err
    assert "\r" not in err  # FFCV's writer draws a tqdm bar of its own unless it is replaced
    lines = err.splitlines()
    assert lines[0] == "rows validated: 0/4" and lines[-1].startswith("images encoded: 4/4 in ")
    assert any(line.startswith("rows validated: 4/4 in ") for line in lines)
    assert lines.index("images encoded: 0/4") > max(i for i, line in enumerate(lines) if line.startswith("rows"))

    prepare(root, tmp_path / "quiet", workers=1, progress="off")
    assert capsys.readouterr().err == ""
