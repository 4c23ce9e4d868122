"""The training recipe: what every Ray Train worker runs, readable top to bottom.

    setup     data -> groups -> model -> optimizer, and the state of a restarted run
    train     epochs of the method's loss (rank 0 logs every log_every steps); after each epoch:
              validate, choose the routes' calibration on validation, keep the best model, report a
              checkpoint to Ray, log the epoch
    finish    the method's after-training step (e.g. re-train the classifier), then one test
              evaluation of the best-on-validation model, reported with the final checkpoint and
              its plots (the driver sends those to MLflow)

One process is the same code with world size 1. The method (groupdir/methods/) supplies the heads,
its own state, how many views of each image a batch holds, the loss terms and the after-training
step; nothing here branches on the method's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from groupdir import checkpoint
from groupdir.checkpoint import TrainState
from groupdir.config import Config
from groupdir.data import open_data
from groupdir.distributed import gather_objects, mean_over_workers, sum_over_workers, sync_buffers, world
from groupdir.errors import TrainingError
from groupdir.evaluation import (TEST_ROUTES, Calibration, Outputs, calibrate, group_centroids, label_prior,
                                 predict, route_metrics, route_values)
from groupdir.grouping import Grouping, make_grouping
from groupdir.labels import label_bins
from groupdir.losses import label_weights
from groupdir.methods import Method, Step, build_model, get_method
from groupdir.model import DIRNet, forward


@dataclasses.dataclass(frozen=True)
class Job:
    """What the driver hands every worker."""
    cfg: Config
    run_id: str              # the MLflow run rank 0 logs to
    progress: str = "lines"  # rank 0's console: bar (a live bar per epoch, and a line) | lines | off


@dataclasses.dataclass(frozen=True)
class Supervision:
    """What the training labels give the losses: their groups, the regression weights (None for
    none), and the log group prior of the classifier's targets (the balanced losses add it)."""
    grouping: Grouping
    weigh: Callable[[np.ndarray], np.ndarray] | None
    group_log_prior: torch.Tensor


@dataclasses.dataclass
class Worker:
    """Everything `setup` builds for the loop."""
    cfg: Config
    job: Job
    method: Method
    rank: int
    world_size: int
    nodes: int
    device: torch.device
    labels: np.ndarray     # the training labels
    loaders: dict
    targets: Supervision
    net: DIRNet            # the model itself (its weights are what is saved)
    model: torch.nn.Module  # what trains: net, wrapped in DDP and torch.compile as configured
    optimizer: torch.optim.Optimizer
    state: TrainState
    run_log: object | None  # rank 0's groupdir.tracking.RunLogger


def train_worker(job: Job) -> None:
    """Ray Train's train_loop_per_worker."""
    started = time.perf_counter()
    worker = setup(job)
    add_time(worker.state, "setup", time.perf_counter() - started)
    try:
        if worker.state.stopped:  # the run stopped for good before this restart: say so again
            report(worker)
            return
        for epoch in range(worker.state.epoch, job.cfg.epochs):
            sums, seconds = train_epoch(worker, epoch)
            end_epoch(worker, epoch, sums, seconds)
        finish(worker)
    except TrainingError as err:  # deterministic: every worker sees it at the same step; no retry
        worker.state.stopped = str(err)
        report(worker)
    finally:
        if worker.run_log:
            worker.run_log.close()


# ========================================= setup ==========================================

def setup(job: Job) -> Worker:
    import ray.train

    cfg = job.cfg
    rank, world_size = world()
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs at INFO on every report
    # 1x1 conv weight gradients have ambiguous strides on the CPU; DDP's warning about them is noise.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    seed_everything(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    method = get_method(cfg.method)

    labels, loaders = open_data(cfg, rank=rank, world_size=world_size, device=device, views=method.views)
    targets, net, optimizer = build_training(cfg, labels, device)
    saved = ray.train.get_checkpoint()
    if saved is None:
        state = TrainState()
    else:
        with saved.as_directory() as folder:
            state = checkpoint.restore(Path(folder), net, optimizer)
    model = net
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    run_log = None
    if rank == 0:
        from groupdir.tracking import RunLogger, Tracker

        run_log = RunLogger(Tracker(cfg.tracking_uri), job.run_id, say)
        run_log.log_epochs(state.history)  # epochs checkpointed but not logged before a crash
    nodes = len(set(gather_objects(ray.get_runtime_context().get_node_id())))
    if rank == 0 and job.progress != "off" and state.epoch == 0:
        say(f"training on {world_size} worker(s) across {nodes} node(s), {device.type}")
    return Worker(cfg, job, method, rank, world_size, nodes, device, labels, loaders, targets, net, model,
                  optimizer, state, run_log)


def build_training(cfg: Config, train_labels: np.ndarray, device: torch.device) -> tuple[Supervision, DIRNet,
                                                                                       torch.optim.Optimizer]:
    """The labels' supervision, the model on `device` (its encoder from init_from, its frozen parts
    frozen) and its optimizer."""
    targets = supervision(cfg, train_labels)
    net = build_model(cfg, train_labels)
    init_regressor_bias(net, train_labels, targets.grouping)
    if cfg.init_from:
        checkpoint.load_encoder(net, cfg.init_from, cfg.backbone)
    if cfg.freeze_encoder:
        net.encoder.requires_grad_(False)
    if get_method(cfg.method).pretrains:  # the heads get no gradient; DDP must not wait for one
        for head in (net.classifier, net.experts):
            if head is not None:
                head.requires_grad_(False)
    net.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    return targets, net, make_optimizer(cfg, net)


def local_worker(cfg: Config, train_labels: np.ndarray, device: torch.device | str = "cpu") -> Worker:
    """One process's Worker, without Ray, loaders or tracking, for code that drives train_step itself
    (the benchmark's loader-free ceiling, the kernel checks)."""
    device = torch.device(device)
    targets, net, optimizer = build_training(cfg, train_labels, device)
    return Worker(cfg, Job(cfg, run_id=""), get_method(cfg.method), 0, 1, 1, device, train_labels, {}, targets,
                  net, net, optimizer, TrainState(), None)


def supervision(cfg: Config, train_labels: np.ndarray) -> Supervision:
    label_range = (cfg.label_min, cfg.label_max) if cfg.label_min is not None else None
    grouping = make_grouping(train_labels, cfg.num_groups, cfg.grouping, label_range)
    weigh = label_weights(train_labels, cfg.reweight, cfg.lds, cfg.lds_kernel, cfg.lds_ks,
                          cfg.lds_sigma, cfg.label_bin_width)
    log_prior = torch.as_tensor(np.log(label_prior(train_labels, grouping, cfg)), dtype=torch.float32)
    return Supervision(grouping, weigh, log_prior)


def init_regressor_bias(model: DIRNet, train_labels: np.ndarray, grouping: Grouping) -> None:
    """Start each regressor at its label prior (the mean training label of its group, the overall
    mean for vanilla), so short runs spend their steps on features rather than on offsets."""
    with torch.no_grad():
        if model.classifier is None:
            model.experts.bias.fill_(float(np.mean(train_labels)))
        else:
            model.experts.bias.copy_(torch.as_tensor(group_centroids(train_labels, grouping)))


def make_optimizer(cfg: Config, net: DIRNet) -> torch.optim.Optimizer:
    """Adam or SGD over the trainable weights; the method's own parameters at their own rate."""
    state = list(net.method_state.parameters()) if net.method_state is not None else []
    weights = [p for p in net.parameters() if p.requires_grad and all(p is not q for q in state)]
    groups = [{"params": weights}]
    if state:
        groups.append({"params": state, "lr": getattr(net.method_state, "lr", cfg.lr), "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ========================================= train ==========================================

def train_epoch(worker: Worker, epoch: int) -> tuple[dict[str, float], float]:
    """One pass over the training split; returns each loss term summed over the steps, and the seconds."""
    worker.model.train()
    if worker.cfg.freeze_encoder:  # a fixed encoder: its BatchNorm statistics stay as trained
        worker.net.encoder.eval()
    worker.loaders["train"].set_epoch(epoch)
    sums: dict[str, float] = {}
    started = fetched = time.perf_counter()
    waited = 0.0  # for the phase times: how long the step waited for its batch
    meter = StepMeter(worker, epoch)
    for images, batch_labels, _ in worker.loaders["train"]:
        waited += time.perf_counter() - fetched
        values = train_step(worker, images, batch_labels)
        check_finite(values, epoch, worker.state.step)
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        worker.state.step += 1
        meter.step(values)
        fetched = time.perf_counter()
    meter.close()
    seconds = time.perf_counter() - started
    add_time(worker.state, "loader_wait", waited)
    add_time(worker.state, "train_steps", seconds - waited)
    return sums, seconds


class StepMeter:
    """Rank 0, during an epoch: every log_every steps the loss terms, learning rate and images/s
    go to MLflow at the global step; with progress=bar, a live bar (Ray's worker-safe tqdm, drawn
    by the driver) shows the epoch's images, their rate and the current loss."""

    def __init__(self, worker: Worker, epoch: int):
        self.worker, self.cfg, self.epoch = worker, worker.cfg, epoch
        self.active = worker.rank == 0
        self.last_step, self.last_time = worker.state.step, time.perf_counter()
        self.bar = None
        if self.active and worker.job.progress == "bar":
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=len(worker.loaders["train"]) * self.cfg.batch_size, unit="img",
                                     desc=f"epoch {epoch + 1}/{self.cfg.epochs}")

    def step(self, values: dict[str, float]) -> None:
        if not self.active:
            return
        step = self.worker.state.step
        if self.bar is not None:
            self.bar.set_description(f"epoch {self.epoch + 1}/{self.cfg.epochs}  loss {values['total']:.3f}")
            self.bar.update(self.cfg.batch_size)
        if self.cfg.log_every and step % self.cfg.log_every == 0:
            now = time.perf_counter()
            rate = (step - self.last_step) * self.cfg.batch_size / max(now - self.last_time, 1e-9)
            self.worker.run_log.log_step(step, {**values, "lr": self.worker.optimizer.param_groups[0]["lr"],
                                                "images_per_second": rate})
            self.last_step, self.last_time = step, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_step(worker: Worker, images, labels) -> dict[str, float]:
    """One optimizer step of the method's loss; returns each term averaged over the workers."""
    targets, device = worker.targets, worker.device
    # Groups, bins and weights from the exact (float64) labels: float32 moves 0.7 into bin 6 of 0.1.
    groups = torch.as_tensor(targets.grouping.assign(labels.numpy()), device=device)
    bins = torch.as_tensor(label_bins(labels.numpy(), worker.cfg.label_bin_width), device=device)
    weights = torch.as_tensor(targets.weigh(labels.numpy()), device=device) if targets.weigh else None
    exact = labels.to(device)
    output = forward(worker.model, images, device, exact if worker.net.feature_smoothing is not None else None)
    step = Step(output, exact.float(), groups, bins, weights, targets.group_log_prior.to(device), worker.state.step,
                worker.net.method_state)
    terms = worker.method.loss_terms(worker.cfg, step)
    values = mean_over_workers(torch.stack([term.detach() for term in terms.values()])).tolist()
    worker.optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    worker.optimizer.step()
    return dict(zip(terms, values))


def check_finite(values: dict[str, float], epoch: int, step: int) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise TrainingError(f"loss term '{name}' is {value} at epoch {epoch + 1}, step {step}; "
                                f"stopping (try a lower lr or a higher temperature)")


def end_epoch(worker: Worker, epoch: int, sums: dict[str, float], seconds: float) -> None:
    """Validate, keep the best model, record the epoch, report the checkpoint, log it."""
    cfg, state = worker.cfg, worker.state
    if worker.net.feature_smoothing is not None:  # the epoch's per-bin feature statistics, from every worker
        worker.net.feature_smoothing.end_epoch(sum_over_workers)
    sync_buffers(worker.net)
    with timed(state, "validation"):
        val, calibration = validate(worker, worker.loaders["val"])
    # A pretraining method has no regressor to select on: it delivers its last epoch.
    improved = val[cfg.select_metric] < state.best_value or worker.method.pretrains
    if improved:
        state.best_value, state.best_epoch = val[cfg.select_metric], epoch + 1
        keep_best(state, worker.net, val, calibration)
    batches = len(worker.loaders["train"])
    state.history.append({"epoch": epoch + 1, "steps": state.step, "train_seconds": seconds,
                          "images_per_second": batches * cfg.batch_size / seconds,
                          **{f"train/{k}": v / batches for k, v in sums.items()},
                          **{f"val/{k}": v for k, v in val.items()}})
    state.epoch = epoch + 1
    with timed(state, "checkpoint"):
        report(worker)
    if worker.run_log:
        with timed(state, "mlflow"):
            worker.run_log.log_epochs(state.history)
        if worker.job.progress != "off":
            say(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {sums['total'] / batches:.3f}  "
                f"val MAE {val['mae/all']:.2f}  bMAE {val['bmae/all']:.2f}  group acc {val['group_acc']:.3f}  "
                f"({calibration.selected_route} route)  {state.history[-1]['images_per_second']:.0f} img/s"
                f"{'  *best' if improved else ''}")


def validate(worker: Worker, loader, retrained: bool = False) -> tuple[dict[str, float], Calibration]:
    """The validation metrics of the route validation selects (with the calibration it chose), and
    each test route's select_metric beside them (ROUTE/METRIC). `retrained`: after crt.py."""
    cfg = worker.cfg
    outputs = predict(worker.net, loader, worker.device)
    calibration = calibrate(outputs, worker.targets.grouping, worker.labels, cfg, retrained)
    results = route_metrics(outputs, worker.targets.grouping, worker.labels, cfg, calibration)
    val = dict(results[calibration.selected_route])
    if math.isnan(val[cfg.select_metric]):
        raise TrainingError(f"validation {cfg.select_metric} is NaN (no validation sample in that "
                            f"shot); pick another select_metric")
    for name in TEST_ROUTES if worker.method.grouped else ():
        val[f"{name}/{cfg.select_metric}"] = results[name][cfg.select_metric]
    val.update(tau=calibration.tau, soft_tau=calibration.soft_tau, route_temperature=calibration.route_temperature)
    return val, calibration


def keep_best(state: TrainState, net: DIRNet, val: dict, calibration: Calibration) -> None:
    """The model now in `net` is the one to deliver, with its validation metrics and calibration."""
    state.best_val, state.best_calibration = val, calibration.to_dict()
    state.best_model = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


# ========================================= finish =========================================

def finish(worker: Worker) -> None:
    """The method's after-training step on the best model, then its one test evaluation."""
    cfg, state = worker.cfg, worker.state
    worker.net.load_state_dict(state.best_model)
    plain_train = lambda: open_data(cfg, ["train"], augmented=None, rank=worker.rank,  # noqa: E731
                                    world_size=worker.world_size, device=worker.device)[1]["train"]
    with timed(state, "after_training"):
        retraining = worker.method.after_training(worker.net, plain_train, worker.targets.grouping,
                                                  worker.targets.group_log_prior, cfg, worker.device)
        if retraining is not None:  # the model changed: validation chooses its calibration again
            keep_best(state, worker.net, *validate(worker, worker.loaders["val"], retrained=True))
    calibration = Calibration.from_dict(state.best_calibration)
    with timed(state, "test"):
        outputs = predict(worker.net, worker.loaders["test"], worker.device)
        results = route_metrics(outputs, worker.targets.grouping, worker.labels, cfg, calibration)
    # validation: the delivered model's validation metrics (what a sweep ranks it by)
    results.update(validation=state.best_val, classifier_retraining=retraining or {}, best_epoch=state.best_epoch,
                   steps=state.step, workers=worker.world_size, nodes=worker.nodes, timings=dict(state.timings))
    state.results = results
    files = {}
    if worker.run_log:  # the driver sends these to MLflow, with what the run log could not send
        files = {**plot_files(worker, outputs), checkpoint.UNSENT_STEPS: json.dumps(worker.run_log.close()).encode()}
    report(worker, files)


def plot_files(worker: Worker, outputs: Outputs) -> dict[str, bytes]:
    """Rank 0: the plots of the selected route on test, as PNG files (path in the checkpoint: bytes)."""
    from groupdir import plots

    cfg, results, grouping = worker.cfg, worker.state.results, worker.targets.grouping
    selected = results["selected_route"]
    calibration = Calibration.from_dict(worker.state.best_calibration)
    value, groups = route_values(outputs, grouping, worker.labels, calibration)[selected]
    figures = {"per_label_mae": plots.per_label_error(value, outputs.target, worker.labels, cfg.label_bin_width),
               "predicted_vs_true": plots.predicted_vs_true(value, outputs.target, selected)}
    if outputs.logits is not None:
        figures["group_confusion"] = plots.group_confusion(groups, grouping.assign(outputs.target), grouping.num_groups)
    return {f"{checkpoint.PLOTS}/{name}.png": png_bytes(figure) for name, figure in figures.items()}


def png_bytes(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


# ======================================== reporting =======================================

def report(worker: Worker, files: dict[str, bytes] | None = None) -> None:
    """Every worker calls this at the same points (`ray.train.report` is a barrier); rank 0 attaches
    the checkpoint folder (groupdir/checkpoint.py), with `files` (path: bytes) in it."""
    import ray.train

    state, cfg = worker.state, worker.cfg
    # For a sweep's scheduler and searcher: the latest epoch's validation metrics (NaN before the
    # first, e.g. a run stopped by a NaN loss) and the run's epoch count (its last epoch is not judged).
    latest = state.history[-1] if state.history else {}
    metrics = {"epoch": state.epoch, "epochs": cfg.epochs, "step": state.step, f"val/{cfg.select_metric}": math.nan,
               **{key: value for key, value in latest.items() if key.startswith("val/")}}
    if worker.rank != 0:
        ray.train.report(metrics)
        return
    with checkpoint.temporary_folder() as folder:
        best = None if state.stopped else checkpoint.best_model_file(state, cfg, worker.targets.grouping.edges,
                                                                      worker.labels)
        checkpoint.write(Path(folder), state, worker.net, worker.optimizer, best, files or {})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def add_time(state: TrainState, phase: str, seconds: float) -> None:
    """Seconds spent in a phase, summed over the run (the demo prints them)."""
    state.timings[phase] = state.timings.get(phase, 0.0) + seconds


@contextlib.contextmanager
def timed(state: TrainState, phase: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        add_time(state, phase, time.perf_counter() - started)


def say(line: str) -> None:
    """A progress line from a worker. Ray Train routes print() through logging (and can show it twice);
    the process's own stdout reaches the driver's terminal once."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()

