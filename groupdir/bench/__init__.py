"""Benchmarks that print ratios measured side by side in one run.

- `bench method` (groupdir/bench/method.py): Group-DIR against the field's baselines on the
  synthetic benchmark, paired seeds, with a verdict per claim.
- `bench loader`: FFCV against a torchvision/PIL DataLoader over the same faces, equal work.
- `bench train`: training images per second per Ray worker, end to end, for 1, 2, ... workers.
- `bench ceiling`: one device, the training step fed by the FFCV loader against the same step on a
  batch already on the device (what the data path costs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from groupdir.config import load_config
from groupdir.data.synth import SynthSpec
from groupdir.atomic import write_text_atomic
from groupdir.bench.method import bench_method
from groupdir.checkpoint import HISTORY
from groupdir.driver import ray_session, train
from groupdir.progress import Mode, Progress
from groupdir.tables import markdown_row, markdown_table

__all__ = ["bench_ceiling", "bench_loader", "bench_loss", "bench_method", "bench_train"]

LOADER_ENCODINGS = (("jpg", 500), ("jpg", 256), ("raw", 256))  # FFCV write mode, max_resolution


def bench_loader(out: Path, images: int = 2000, sizes=(112, 224), workers: int = 2, batch_size: int = 128,
                 epochs: int = 2, progress: Mode = "off") -> str:
    """FFCV vs torchvision/PIL over the same faces, doing the same work: each delivers augmented
    (pad-and-crop, flip), normalised float batches on the training device (here the CPU).

    Both read the training split of one synthetic set of 250-500 px JPEGs: torchvision from the
    JPEG files (PIL decode -> Resize -> RandomCrop with padding -> flip in `workers` processes, then
    normalised on the device), FFCV from shards (decode -> resize in `workers` threads, then the
    batched augmentation and normalisation on the device) in three encodings: the same images as
    JPEG at full size, JPEG capped at 256 px, and raw pixels capped at 256 px; a last column shows
    the raw shards without the augmentation (what it costs). One untimed pass warms the page cache
    and FFCV's JIT; then `epochs` timed passes each, side by side. `progress` shows the data's writing
    and encoding, then the loaders measured.
    """
    import torch

    from groupdir.data import synthetic_shards
    from groupdir.data.dir_format import read_dir_table
    from groupdir.data.ffcv_loader import ShardLoader
    from groupdir.data.loaders import make_loader
    from groupdir.data.shards import Encoding

    faces = SynthSpec(train=images, eval_cap=1, eval_min=1, image_size=250, image_size_max=500)
    shards = {(mode, resolution): synthetic_shards(out, spec=faces, name=f"shards-{mode}-{resolution}",
                                                   encoding=Encoding(max_resolution=resolution, write_mode=mode),
                                                   workers=workers, progress=progress)
              for mode, resolution in LOADER_ENCODINGS}
    table = read_dir_table(out / "data", check_images=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def rate(loader) -> float:
        for _ in loader:  # warm-up
            pass
        count, started = 0, time.perf_counter()
        for _ in range(epochs):
            for batch, _, _ in loader:
                count += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return count / (time.perf_counter() - started)

    def loaders(size: int):
        """torchvision, FFCV in each encoding, the raw shards without augmentation: the table's columns."""
        yield make_loader(table.paths["train"], table.labels["train"], size, batch_size, train=True, workers=workers,
                          device=device)
        for key in LOADER_ENCODINGS:
            yield ShardLoader(shards[key], "train", size, batch_size, train=True, workers=workers, device=device)
        yield ShardLoader(shards["raw", 256], "train", size, batch_size, train=False, workers=workers, device=device)

    header = ["output size", "torchvision/PIL", *(f"FFCV {mode} {resolution} px" for mode, resolution in LOADER_ENCODINGS),
              "FFCV raw 256 px, no augmentation"]
    lines = [f"Loader throughput in images/s (ratio to torchvision): augmented, normalised float batches on "
             f"the {device.type.upper()}, training split of {table.size('train')} synthetic faces of 250-500 px, "
             f"{workers} worker processes / FFCV threads each, batch {batch_size}, {epochs} timed passes after "
             f"one warm-up", "", *markdown_table(header, [], text_columns=0)]
    with Progress(len(sizes) * (len(LOADER_ENCODINGS) + 2), "loaders measured", progress) as measured:
        for size in sizes:
            rates = []
            for loader in loaders(size):
                rates.append(rate(loader))
                measured.update()
            baseline, *ffcv = rates
            lines.append(markdown_row([size, f"{baseline:.0f}", *(f"{r:.0f} ({r / baseline:.2f}x)" for r in ffcv)]))
            measured.write(lines[-1])
    disk = {"JPEG files": sum(path.stat().st_size for path in table.paths["train"]),
            **{f"FFCV {mode} {resolution} px": sum(f.stat().st_size for f in shards[mode, resolution].glob("train*.beton"))
               for mode, resolution in LOADER_ENCODINGS}}
    lines += ["", "Training split on disk: " + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in disk.items())]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "loader.md", text)
    print(text)
    return text


def bench_train(out: Path, worker_counts=(1, 2), train_size: int = 2000, epochs: int = 3, batch_size: int = 128,
                overrides: list[str] | None = None, tracking_uri: str = "", data: str = "",
                progress: Mode = "off") -> str:
    """Training images per second per worker, end to end (FFCV shards -> DDP step), for each worker
    count, one CPU thread per worker, on `data` or the demo's synthetic shards of `train_size` faces; scaling efficiency = per-worker rate / the 1-worker rate. Epoch
    1 pays FFCV's JIT compile and is left out: the rate is the median of the later epochs. `progress`
    shows the data's writing and encoding, then the worker counts measured."""
    import statistics

    from groupdir.data import synthetic_shards

    data = data or str(synthetic_shards(out, train_size, progress=progress))
    rates = {}
    with ray_session(num_cpus=max(worker_counts)), \
            Progress(len(worker_counts), "worker counts measured", progress) as measured:
        for workers in worker_counts:
            pairs = {"data": data, "workers": workers, "epochs": epochs, "batch_size": batch_size,
                     "threads": 1, "device": "cpu", "experiment": "bench-train", "tracking_uri": tracking_uri}
            cfg = load_config(overrides=[f"{k}={v}" for k, v in pairs.items()] + list(overrides or []))
            run_dir = out / f"workers-{workers}"
            measured.write(f"{workers} worker(s) ...")
            train(cfg, run_dir, progress="off", force=True)
            history = json.loads((run_dir / HISTORY).read_text())
            rates[workers] = statistics.median(h["images_per_second"] for h in history[1:] or history)
            measured.update()
    base = rates[worker_counts[0]] / worker_counts[0]
    lines = [f"Training throughput, data {data}, "
             f"{cfg.backbone} at {cfg.image_size} px, global batch {batch_size}, {epochs} epochs, one CPU "
             f"thread per worker" + (f"; overrides: {' '.join(overrides)}" if overrides else ""), "",
             *markdown_table(["workers", "images/s, all workers", "images/s per worker", "scaling efficiency"],
                             [[workers, f"{rate:.0f}", f"{rate / workers:.0f}", f"{rate / workers / base:.2f}"]
                              for workers, rate in rates.items()], text_columns=0)]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "train.md", text)
    print(text)
    return text


def bench_ceiling(out: Path, backbone: str = "resnet50", image_size: int = 224, batch_size: int = 256,
                  steps: int = 30, loader_workers: int = 8, images: int = 3000, source_size: int = 256,
                  progress: Mode = "off") -> str:
    """One device: the training step (bf16 autocast and channels_last on CUDA) fed by the FFCV loader,
    against the same step on a batch already on the device, the loader-free ceiling. Both run
    `steps` timed steps after as many warm-up steps. `progress` shows the data's writing and
    encoding, then the steps run (two cases of a few slow steps: steps say more than cases)."""
    import torch

    from groupdir.data import open_data, synthetic_shards
    from groupdir.data.shards import Encoding
    from groupdir.recipe import local_worker, train_step

    shards = synthetic_shards(out, spec=SynthSpec(train=images, eval_cap=1, eval_min=1, image_size=source_size),
                              encoding=Encoding(max_resolution=source_size), progress=progress)
    cfg = load_config(overrides={"data": str(shards), "backbone": backbone, "image_size": image_size,
                                 "batch_size": batch_size, "loader_workers": loader_workers})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labels, loaders = open_data(cfg, ["train"], device=device)
    worker = local_worker(cfg, labels, device)

    def batches():
        while True:
            yield from loaders["train"]

    def rate(feed, steps_run: Progress) -> float:
        for _ in range(steps):  # warm-up: cuDNN autotuning, FFCV's JIT, allocator
            train_step(worker, *next(feed)[:2])
            steps_run.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            train_step(worker, *next(feed)[:2])
            steps_run.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch_size / (time.perf_counter() - started)

    feed = batches()
    images_batch, labels_batch, _ = next(feed)
    resident = (images_batch.to(device).clone(), labels_batch.clone())
    with Progress(4 * steps, "steps run", progress) as steps_run:
        ceiling = rate(iter(lambda: (*resident, None), None), steps_run)
        fed = rate(feed, steps_run)
    feed.close()  # closes FFCV's iterator and its threads
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    text = "\n".join([
        f"Training step throughput on one {name}: {backbone}, {image_size} px, batch {batch_size}"
        + (", bf16 autocast, channels_last" if device.type == "cuda" else ", float32")
        + f", {steps} timed steps after {steps} warm-up steps; FFCV shards of {source_size} px JPEG faces, "
        f"{loader_workers} loader threads", "",
        *markdown_table(["feed", "images/s"], [["batch already on the device (ceiling)", f"{ceiling:.0f}"],
                                               ["FFCV loader", f"{fed:.0f}"]]), "",
        f"Loader overhead: {100 * (1 - fed / ceiling):.1f}% of the ceiling (FFCV / ceiling = {fed / ceiling:.2f}).",
    ]) + "\n"
    write_text_atomic(out / "ceiling.md", text)
    print(text)
    return text


def bench_loss(out: Path, batch_sizes=(128, 256, 512, 1024, 4096, 8192), dims=(128, 2048), repeats: int = 3,
               naive_max: int = 512, num_groups: int = 20, progress: Mode = "off") -> str:
    """Forward + backward of the contrastive loss per backend (naive B x B x B, torch O(B^2), and the
    Triton kernel on CUDA at each matmul precision) and of the bare similarity matmul (the floor), side
    by side: median milliseconds of `repeats` timed runs after one warm-up, and peak memory on CUDA;
    beside them the matmul GFLOP of each path, forward + backward (groupdir/kernels/flops.py), on any
    device. On CUDA the kernels' correctness table at each precision comes first. `progress` shows
    the (D, B) cases measured."""
    import torch

    from groupdir.config import PRECISIONS
    from groupdir.kernels.flops import matmul_flops
    from groupdir.losses import group_contrastive_loss

    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    timed = [("naive", "naive", "ieee"), ("torch", "torch", "ieee")]  # (column, backend, precision)
    if cuda:  # the Triton kernels run on CUDA only
        timed += [("triton" if precision == "ieee" else f"triton {precision}", "triton", precision)
                  for precision in PRECISIONS]
    counted = ["floor", "torch", "triton", "triton, old backward"]  # GFLOP columns
    correctness = ""
    if cuda:
        from groupdir.kernels.check import check_table, kernel_cases

        correctness = check_table({precision: kernel_cases("cuda", precision) for precision in PRECISIONS}) + "\n"
        print(correctness, flush=True)

    def floor(z, groups):
        unit = torch.nn.functional.normalize(z, dim=1)
        return (unit @ unit.T).sum()

    def measure(fn, z, groups) -> tuple[float, float]:
        times = []
        for attempt in range(repeats + 1):
            z.grad = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            fn(z, groups).backward()
            if cuda:
                torch.cuda.synchronize()
            if attempt:
                times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        return 1000 * float(np.median(times)), peak

    def case_row(dim: int, batch: int) -> str:
        """The table's row for one feature width D and batch size B."""
        generator = torch.Generator().manual_seed(batch)
        z = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
        groups = torch.randint(0, num_groups, (batch,), generator=generator).to(device)
        cells, timing = [], {}
        floor_ms, floor_peak = measure(floor, z, groups)
        cells.append(f"{floor_ms:.1f}" + (f" ({floor_peak:.0f})" if cuda else ""))
        for column, backend, precision in timed:
            if backend == "naive" and batch > naive_max:
                cells.append("-")
                continue
            ms, peak = measure(lambda z, g, b=backend, p=precision: group_contrastive_loss(
                z, g, backend=b, precision=p, num_groups=num_groups), z, groups)
            timing[column] = ms
            cells.append(f"{ms:.1f}" + (f" ({peak:.0f})" if cuda else ""))
        cells.append(f"{timing['naive'] / timing['torch']:.0f}x" if "naive" in timing else "-")
        if cuda:
            cells.append(f"{timing['triton'] / floor_ms:.2f}")
        flops = matmul_flops(batch, dim, num_groups)
        cells += [f"{flops[path][0] / 1e9:.3g} + {flops[path][1] / 1e9:.3g}" for path in counted]
        return markdown_row([dim, batch, *cells])

    lines = [f"Contrastive loss, forward + backward, {num_groups} groups, cosine, float32, on "
             f"{torch.cuda.get_device_name() if cuda else 'the CPU'}: median ms of {repeats} runs"
             + (" (peak MiB)" if cuda else "") + "; naive only up to B = " + str(naive_max)
             + "; matmul GFLOP forward + backward", "",
             *markdown_table(["D", "B", "matmul floor", *(column for column, _, _ in timed), "torch speed-up over naive",
                              *(["triton / floor"] if cuda else []), *(f"GFLOP {path}" for path in counted)],
                             [], text_columns=0)]
    with Progress(len(dims) * len(batch_sizes), "cases measured", progress) as measured:
        for dim in dims:
            for batch in batch_sizes:
                lines.append(case_row(dim, batch))
                measured.write(lines[-1])
                measured.update()
    text = correctness + "\n".join(lines) + "\n"
    write_text_atomic(out / "loss.md", text)
    print(text)
    return text
