"""What several test modules share: the tiny data set's size and step counts, real checkpoints
made without training, and failure injection, handed to the driver as its worker loop so that it
stays out of the product (no config key, no check in the training loop)."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import ray.cloudpickle
import torch

from groupdir import checkpoint, recipe
from groupdir.config import load_config
from groupdir.evaluation import Calibration

TRAIN_ROWS = 600  # the `tiny_synth` fixture's training split (conftest.py)


def steps_per_epoch(batch_size: int, workers: int = 1, train_rows: int = TRAIN_ROWS) -> int:
    """Optimizer steps in one epoch: each worker gets an equal slice of the rows and drops its last
    partial batch of batch_size / workers."""
    return (train_rows // workers) // (batch_size // workers)


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a test's own server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def saved_checkpoint(path: Path, train_labels, **settings) -> Path:
    """A checkpoint.pt in the format a run writes, of an untrained model built the trainer's way
    (recipe.local_worker, without Ray) for `train_labels` and config `settings`: what eval,
    load_model and init_from read, in a fraction of a second."""
    cfg = load_config(overrides={"image_size": 16, **settings})
    labels = np.asarray(train_labels, dtype=np.float64)
    worker = recipe.local_worker(cfg, labels)
    grouping = worker.targets.grouping
    state = checkpoint.TrainState(best_model=worker.net.state_dict(),
                                  best_calibration=Calibration(shift=(0.0,) * grouping.num_groups).to_dict())
    torch.save(checkpoint.best_model_file(state, cfg, grouping.edges, labels), path)
    return Path(path)


# Ray ships these hooks to its workers by value: the workers cannot import the tests folder.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CrashOnce:
    """The recipe, except that the last worker dies as a crashed process would (no exception, no
    clean-up) at optimizer step `step`, once per run: the marker file remembers the crash."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, Path(marker)

    def __call__(self, job: recipe.Job) -> None:
        import ray.train

        context = ray.train.get_context()
        if context.get_world_rank() == context.get_world_size() - 1 and not self.marker.exists():
            original, steps = recipe.train_step, [0]

            def crashing_step(*args, **kwargs):
                if steps[0] == self.step:
                    self.marker.write_text(f"worker {os.getpid()} killed at step {self.step}\n")
                    os._exit(1)
                steps[0] += 1
                return original(*args, **kwargs)

            recipe.train_step = crashing_step
        recipe.train_worker(job)


class FailWhen:
    """The recipe, except that it raises at the start when config key `key` has `value` (a sweep
    trial that fails)."""

    def __init__(self, key: str, value):
        self.key, self.value = key, value

    def __call__(self, job: recipe.Job) -> None:
        if getattr(job.cfg, self.key) == self.value:
            raise RuntimeError(f"injected failure: {self.key}={self.value!r}")
        recipe.train_worker(job)


def on_gloo_ranks(work, world_size: int, folder: Path) -> list:
    """`work(rank)` (a module-level function returning JSON-able results) on `world_size` spawned
    processes joined in one gloo process group, as DDP workers are; each rank's results, in order."""
    import torch.multiprocessing as mp

    outs = [str(Path(folder) / f"rank{rank}.json") for rank in range(world_size)]
    mp.spawn(_gloo_rank, args=(work, world_size, str(Path(folder) / "store"), outs), nprocs=world_size)
    return [json.loads(Path(out).read_text()) for out in outs]


def _gloo_rank(rank: int, work, world_size: int, store: str, outs: list) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    Path(outs[rank]).write_text(json.dumps(work(rank)))
    dist.barrier()  # every rank's results are written
    # Tearing gloo down at exit sometimes aborts a rank ("terminate called without an active
    # exception", a joinable C++ thread destroyed); the results are in, so leave without teardown.
    os._exit(0)
