"""The training recipe and its Ray Train driver.

`train_worker` is the per-worker loop, readable top to bottom: data -> groups -> model -> epochs of
paper Eq. 5 -> validate -> checkpoint -> test the best-on-validation model once. Ray Train runs it
on `workers` DDP processes (one process is the same code with world size 1). `train` is the driver:
it checks everything it can before Ray starts, creates the MLflow run, runs the TorchTrainer, and
writes the run folder: checkpoint.pt (best on validation), history.json, results.json.

Fault tolerance: every epoch ends with `ray.train.report` and a checkpoint (model, optimizer, step,
history, best model). A failed worker makes Ray restart all workers from the latest checkpoint, and
the loaders replay that epoch's order; rerunning the same command on the same run folder after a
driver crash does the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from groupdir import __version__
from groupdir.atomic import write_json_atomic
from groupdir.config import Config, load_config
from groupdir.data import open_data, set_epoch, train_labels
from groupdir.data.shards import META, is_shards_dir, read_meta
from groupdir.distributed import gather_objects, global_batch, mean_over_workers, sync_buffers, world
from groupdir.errors import ConfigError, TrainingError
from groupdir.evaluation import (TEST_ROUTES, Calibration, Outputs, calibrate, group_centroids, label_prior, predict,
                                 route_metrics, route_values)
from groupdir.grouping import Grouping, make_grouping
from groupdir.losses import group_contrastive_loss, group_loss, label_weights, regression_loss
from groupdir.metrics import format_shot_table
from groupdir.model import DIRNet, Output, forward

CHECKPOINT = "checkpoint.pt"   # run folder: the best-on-validation model, what `groupdir eval` reads
RESULTS = "results.json"
HISTORY = "history.json"
RUN_RECORD = "run.json"        # the MLflow run id and the config, for resuming
STATE = "train_state.pt"       # inside each Ray checkpoint: everything needed to go on
STOPPED = "stopped.json"       # inside a Ray checkpoint: the run stopped for good (a NaN loss)
RESUME_MAY_CHANGE = ("address", "max_failures", "fail_at_step")


# ======================================= driver ==========================================

def train(cfg: Config, run_dir: str | Path, progress: bool = True, force: bool = False) -> dict:
    """Train on Ray (embedded or `cfg.address`), track in MLflow, write the run folder; test results."""
    from groupdir import tracking

    run_dir = Path(run_dir).resolve()
    cfg = resolve_paths(cfg)
    dataset = preflight(cfg)
    tracking.check_reachable(cfg.tracking_uri)
    if cfg.address and cfg.tracking_uri.startswith("sqlite:"):
        print(f"note: on a multi-node cluster every node must see {cfg.tracking_uri} at that path; "
              f"otherwise run an MLflow server (docs/reference.md: Run on a cluster)", flush=True)
    with ray_session(cfg.address):
        cfg, use_gpu = fit_resources(cfg)  # before anything is written: a refused run leaves no trace
        previous = claim_run_dir(run_dir, cfg, force)
        if previous:
            print(f"resuming the run in {run_dir} (MLflow run {previous['mlflow_run_id']})", flush=True)
        run_id = tracking.open_run(cfg.tracking_uri, cfg.experiment, run_dir.name, cfg.to_dict(),
                                   tracking.provenance_tags(cfg, dataset),
                                   previous["mlflow_run_id"] if previous else "")
        # Ray keeps the checkpoints in storage/ray_name; a new name for every fresh run, so that runs
        # sharing a storage_path (or a run started over with --force) never pick up another's.
        ray_name = previous["ray_name"] if previous else f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        storage = cfg.storage_path or str(run_dir / "ray")
        write_json_atomic(run_dir / RUN_RECORD, {"mlflow_run_id": run_id, "ray_name": ray_name,
                                                 "config": cfg.to_dict()})
        return train_run(cfg, use_gpu, run_dir, storage, ray_name, run_id, progress)


def train_run(cfg: Config, use_gpu: bool, run_dir: Path, storage: str, ray_name: str, run_id: str,
              progress: bool, callbacks: tuple = (), mark_failures: bool = True) -> dict:
    """One training run to its end, in a connected Ray session: the TorchTrainer, then the run folder
    and the MLflow run's status. Shared by `train` and every sweep trial; returns the test results.
    A sweep trial passes mark_failures=False: only the sweep's driver can tell a failure from a
    trial that Tune tears down (stopped early, or the sweep interrupted)."""
    from groupdir import tracking

    job = {"cfg": cfg, "run_id": run_id, "progress": progress,
           "failure_marker": f"{storage}/{ray_name}/failure-injected"}
    try:
        final = run_trainer(cfg, use_gpu, run_dir, storage, ray_name, job, callbacks)
        if STOPPED in final:
            raise TrainingError(final[STOPPED]["message"])
    except BaseException as err:
        if not mark_failures:
            raise
        interrupted = isinstance(err, KeyboardInterrupt)
        tracking.finish_run(cfg.tracking_uri, run_id, "KILLED" if interrupted else "FAILED",
                            error="" if interrupted else f"{type(err).__name__}: {err}")
        raise
    write_json_atomic(run_dir / HISTORY, final["history"])
    tracking.finish_run(cfg.tracking_uri, run_id, "FINISHED")
    write_json_atomic(run_dir / RESULTS, final["results"])  # last: its presence means "finished"
    return final["results"]


def resolve_paths(cfg: Config) -> Config:
    """Paths made absolute, since Ray workers run in other folders (or on other nodes)."""
    from groupdir.tracking import resolve_uri

    return dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()) if cfg.data else "",
                               storage_path=local_absolute(cfg.storage_path), tracking_uri=resolve_uri(cfg.tracking_uri))


def preflight(cfg: Config) -> str:
    """Everything that can be refused before Ray starts; returns the data set's name."""
    if not cfg.data:
        raise ConfigError("no data: pass --data DATA (FFCV shards or a DIR data root)")
    labels = train_labels(cfg)
    supervision(cfg, labels)  # raises on more groups than labels, a bad LDS setting
    if len(labels) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(labels)} training rows: no full batch")
    if is_shards_dir(cfg.data):
        meta = read_meta(cfg.data)
        for split, shards in meta["shards"].items():
            if len(shards) > 1 and len(shards) % cfg.workers:
                raise ConfigError(f"{len(shards)} shards of split {split!r} cannot be shared by workers="
                                  f"{cfg.workers}; prepare with --num-shards a multiple of the worker count")
            smallest = min(shard["rows"] for shard in shards)
            if split == "train" and len(shards) > 1 and smallest < cfg.batch_size // cfg.workers:
                raise ConfigError(f"a train shard of {smallest} rows holds no full batch of "
                                  f"{cfg.batch_size // cfg.workers} per worker; prepare fewer shards")
        return meta["dataset"]
    return Path(cfg.data).name


def claim_run_dir(run_dir: Path, cfg: Config, force: bool) -> dict | None:
    """A finished run is kept unless `force`; an unfinished one with the same config is resumed.
    Returns the run record to resume from, or None for a fresh run."""
    record_file = run_dir / RUN_RECORD
    if force:
        for name in (CHECKPOINT, RESULTS, HISTORY, RUN_RECORD):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "ray", ignore_errors=True)
    elif (run_dir / RESULTS).exists():
        raise FileExistsError(f"{run_dir} already holds a finished run; pick another --out or pass --force")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not record_file.exists():
        return None
    record = json.loads(record_file.read_text())
    changed = sorted(key for key, value in cfg.to_dict().items()
                     if record["config"].get(key) != value and key not in RESUME_MAY_CHANGE)
    if changed:
        raise ConfigError(f"{run_dir} holds an unfinished run with other settings ("
                          + ", ".join(f"{k}: {record['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
                          + "); rerun with the same settings to resume it, or pass --force to start over")
    return record


@contextlib.contextmanager
def ray_session(address: str = "", num_cpus: int | None = None):
    """Connect to `address`, or start an embedded local Ray that stops on leaving; an already
    connected session (a test's, the demo's) is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address or None, num_cpus=None if address else num_cpus, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def run_trainer(cfg: Config, use_gpu: bool, run_dir: Path, storage: str, ray_name: str, job: dict,
                callbacks: tuple = ()) -> dict:
    """One Ray Train run; copies the best model to the run folder and returns the results and
    history of the final checkpoint (or its STOPPED record). `callbacks`: Ray Train callbacks (a
    sweep trial passes Tune's, which forwards every report to the Tune scheduler)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker, train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.placement),
        run_config=ray.train.RunConfig(
            name=ray_name, storage_path=storage, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainingError(f"training failed after {cfg.max_failures} restart(s): {worker_error(err)}") from None
    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        if (folder / STOPPED).exists():
            return {STOPPED: json.loads((folder / STOPPED).read_text())}
        shutil.copyfile(folder / CHECKPOINT, run_dir / (CHECKPOINT + ".tmp"))
        os.replace(run_dir / (CHECKPOINT + ".tmp"), run_dir / CHECKPOINT)
        return {"results": json.loads((folder / RESULTS).read_text()),
                "history": json.loads((folder / HISTORY).read_text())}


def fit_resources(cfg: Config) -> tuple[Config, bool]:
    """The config with cpus_per_worker resolved, and whether to train on GPUs (device=auto: when the
    cluster has any). A run that cannot fit is refused (Ray would wait for resources forever), unless
    the cluster may grow (one joined by address)."""
    import ray

    cluster = ray.cluster_resources()
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    if not cfg.cpus_per_worker:  # auto: a local Ray's CPUs shared out; 1 where the cluster may grow
        cfg = dataclasses.replace(cfg, cpus_per_worker=1.0 if cfg.address else float(max(1, int(cpus // cfg.workers))))
    use_gpu = gpus > 0 if cfg.device == "auto" else cfg.device == "cuda"
    if use_gpu and (cfg.gpus_per_worker < 1 or cfg.gpus_per_worker != int(cfg.gpus_per_worker)):
        raise ConfigError(f"gpus_per_worker={cfg.gpus_per_worker:g}: each DDP worker needs whole GPUs of its own "
                          f"(NCCL refuses two workers on one GPU)")
    if not cfg.address:
        if cfg.workers * cfg.cpus_per_worker > cpus:
            raise ConfigError(f"workers={cfg.workers} x cpus_per_worker={cfg.cpus_per_worker:g} needs "
                              f"{cfg.workers * cfg.cpus_per_worker:g} CPUs; this Ray has {cpus:g}")
        if use_gpu and cfg.workers * cfg.gpus_per_worker > gpus:
            raise ConfigError(f"workers={cfg.workers} x gpus_per_worker={cfg.gpus_per_worker:g} needs more "
                              f"GPUs than the {gpus:g} here")
    return cfg, use_gpu


def local_absolute(path: str) -> str:
    """A local path made absolute (Ray and its workers run elsewhere); URIs (s3://...) as they are."""
    return path if not path or "://" in path else str(Path(path).expanduser().resolve())


def worker_error(err) -> str:
    """The first worker's own exception message from Ray's wrapper."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        first_line = (str(failure).strip().splitlines() or [""])[0]  # Ray appends pages of advice
        return f"worker {rank}: {type(failure).__name__}: {first_line}"
    return str(err)


# ====================================== per worker =======================================

def train_worker(job: dict) -> None:
    """What every Ray Train worker runs (world size 1 is the single-process case)."""
    import ray.train

    cfg: Config = job["cfg"]
    rank, world_size = world()
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs at INFO on every report
    # 1x1 conv weight gradients have ambiguous strides on the CPU; DDP's warning about them is noise.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    seed_everything(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()

    # --- data and groups ------------------------------------------------------------------
    labels, loaders = open_data(cfg, rank=rank, world_size=world_size)
    targets = supervision(cfg, labels)
    grouping = targets.grouping

    # --- model, optimiser, and the state of a restarted run -------------------------------
    net = DIRNet(cfg.backbone, cfg.num_groups, grouped=cfg.method == "groupdir")
    init_regressor_bias(net, labels, grouping)
    net.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = restore(ray.train.get_checkpoint(), net, optimizer)
    if STOPPED in state:  # the run stopped for good before the restart: say so again
        report(state, rank, cfg)
        return
    model = net
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    logger = None
    if rank == 0:
        from groupdir.tracking import RunLogger

        logger = RunLogger(cfg.tracking_uri, job["run_id"])
        logger.log_epochs(state["history"])  # epochs checkpointed but not logged before a crash
    nodes = len(set(gather_objects(ray.get_runtime_context().get_node_id())))
    if rank == 0 and job["progress"] and state["epoch"] == 0:
        say(f"training on {world_size} worker(s) across {nodes} node(s), {device.type}")
    step = state["step"]

    # --- epochs ---------------------------------------------------------------------------
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            model.train()
            set_epoch(loaders["train"], epoch)
            sums: dict[str, float] = {}
            started = time.perf_counter()
            for images, batch_labels, _ in loaders["train"]:
                if step == cfg.fail_at_step and rank == world_size - 1:
                    inject_failure(Path(job["failure_marker"]))
                values = train_step(cfg, model, optimizer, images, batch_labels, targets, device)
                check_finite(values, epoch, step)
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
                step += 1
            seconds = time.perf_counter() - started
            batches = len(loaders["train"])
            sync_buffers(net)
            val, calibration = validate(net, loaders["val"], grouping, labels, cfg, device)
            improved = val[cfg.select_metric] < state["best_value"]
            if improved:
                state.update(best_value=val[cfg.select_metric], best_epoch=epoch + 1, best_val=val,
                             best_calibration=calibration.to_dict(),
                             best_model={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            state["history"].append({
                "epoch": epoch + 1, "steps": step, "train_seconds": seconds,
                "images_per_second": batches * cfg.batch_size / seconds,
                **{f"train/{k}": v / batches for k, v in sums.items()}, **{f"val/{k}": v for k, v in val.items()}})
            state.update(epoch=epoch + 1, step=step)
            report(state, rank, cfg, net, optimizer, grouping, labels)
            if logger:
                logger.log_epochs(state["history"])
                if job["progress"]:
                    say(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {sums['total'] / batches:.3f}  "
                        f"val MAE {val['mae/all']:.2f}  bMAE {val['bmae/all']:.2f}  group acc "
                        f"{val['group_acc']:.3f}  ({calibration.selected_route} route)  "
                        f"{state['history'][-1]['images_per_second']:.0f} img/s{'  *best' if improved else ''}")

        # --- after training, on validation only: re-train the classifier, calibrate the routes -
        net.load_state_dict(state["best_model"])
        retraining = {}
        if cfg.crt_epochs and cfg.method == "groupdir":
            from groupdir.crt import retrain_classifier

            plain_train = open_data(cfg, ["train"], augmented=None, rank=rank, world_size=world_size)[1]["train"]
            retraining = retrain_classifier(net, plain_train, grouping, targets.group_log_prior, cfg, device)
            state["best_model"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            state["best_val"], calibration = validate(net, loaders["val"], grouping, labels, cfg, device, retrained=True)
            state["best_calibration"] = calibration.to_dict()
        calibration = Calibration.from_dict(state["best_calibration"])

        # --- one test evaluation of the best-on-validation model --------------------------
        outputs = predict(net, loaders["test"], device)
        results = route_metrics(outputs, grouping, labels, cfg, calibration)
        # validation: the delivered model's validation metrics (what a sweep ranks it by)
        results.update(validation=state["best_val"], classifier_retraining=retraining,
                       best_epoch=state["best_epoch"], steps=step, workers=world_size, nodes=nodes)
        state["results"] = results
        report(state, rank, cfg, net, optimizer, grouping, labels)
        if logger and not logger.final_logged():
            log_final_artifacts(logger, cfg, results, outputs, labels, grouping, state)
    except TrainingError as err:  # deterministic: every worker sees it at the same step; no retry
        state[STOPPED] = {"message": str(err)}
        report(state, rank, cfg)
    finally:
        if logger:
            logger.close()


@dataclasses.dataclass(frozen=True)
class Supervision:
    """What the training labels give the losses: their groups, the regression weights (None for
    none), and the log group prior of the classifier's targets (the balanced losses add it)."""
    grouping: Grouping
    weigh: Callable[[np.ndarray], np.ndarray] | None
    group_log_prior: torch.Tensor


def supervision(cfg: Config, train_labels: np.ndarray) -> Supervision:
    label_range = (cfg.label_min, cfg.label_max) if cfg.label_min is not None else None
    grouping = make_grouping(train_labels, cfg.num_groups, cfg.grouping, label_range)
    weigh = label_weights(train_labels, cfg.reweight, cfg.lds, cfg.lds_kernel, cfg.lds_ks,
                          cfg.lds_sigma, cfg.label_bin_width)
    log_prior = torch.as_tensor(np.log(label_prior(train_labels, grouping, cfg)), dtype=torch.float32)
    return Supervision(grouping, weigh, log_prior)


def train_step(cfg: Config, model, optimizer, images, labels, targets: Supervision, device) -> dict[str, float]:
    """One optimizer step of paper Eq. 5; returns each loss term averaged over the workers."""
    groups = torch.as_tensor(targets.grouping.assign(labels.numpy()), device=device)
    weights = torch.as_tensor(targets.weigh(labels.numpy()), device=device) if targets.weigh else None
    output = forward(model, images, device)
    terms = loss_terms(cfg, output, labels.to(device, torch.float32), groups, weights, targets.group_log_prior)
    values = mean_over_workers(torch.stack([term.detach() for term in terms.values()])).tolist()
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    return dict(zip(terms, values))


def loss_terms(cfg: Config, output: Output, labels: torch.Tensor, groups: torch.Tensor,
               weights: torch.Tensor | None, group_log_prior: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Paper Eq. 5: lambda_grc * L_grc + lambda_reg * L_reg + lambda_soft * L_cls, term by term,
    in float32 whatever the autocast precision of the forward pass."""
    experts = output.experts.float()
    if cfg.method == "vanilla":
        reg = regression_loss(experts[:, 0], labels, cfg.reg_loss, weights)
        return {"total": reg, "reg": reg}
    # Training regresses every sample with its TRUE group's expert.
    reg = regression_loss(experts.gather(1, groups[:, None]).squeeze(1), labels, cfg.reg_loss, weights)
    logits = output.group_logits.float()
    cls = group_loss(logits, groups, cfg.group_loss, cfg.beta, group_log_prior)
    if cfg.soft_reduction == "sum":  # the authors' code summed over its batch: B x the mean, B the global batch
        cls = cls * cfg.batch_size
    terms = {"reg": reg, "cls": cls}
    total = cfg.lambda_reg * reg + cfg.lambda_soft * cls
    if cfg.lambda_grc > 0:
        features, contrast_groups = output.features.float(), groups
        if cfg.contrast_scope == "global":
            features, contrast_groups = global_batch(features, groups)
        terms["grc"] = group_contrastive_loss(features, contrast_groups, cfg.temperature, cfg.similarity,
                                              cfg.loss_backend)
        total = total + cfg.lambda_grc * terms["grc"]
    return {"total": total, **terms}


def validate(net: DIRNet, loader, grouping: Grouping, train_labels: np.ndarray, cfg: Config,
             device: torch.device, retrained: bool = False) -> tuple[dict[str, float], Calibration]:
    """The validation metrics of the route validation selects (with the calibration it chose), and
    each test route's select_metric beside them (ROUTE/METRIC). `retrained`: after crt.py."""
    outputs = predict(net, loader, device)
    calibration = calibrate(outputs, grouping, train_labels, cfg, retrained)
    results = route_metrics(outputs, grouping, train_labels, cfg, calibration)
    val = dict(results[calibration.selected_route])
    if math.isnan(val[cfg.select_metric]):
        raise TrainingError(f"validation {cfg.select_metric} is NaN (no validation sample in that "
                            f"shot); pick another select_metric")
    for name in TEST_ROUTES if cfg.method == "groupdir" else ():
        val[f"{name}/{cfg.select_metric}"] = results[name][cfg.select_metric]
    val.update(tau=calibration.tau, soft_tau=calibration.soft_tau, route_temperature=calibration.route_temperature)
    return val, calibration


def init_regressor_bias(model: DIRNet, train_labels: np.ndarray, grouping: Grouping) -> None:
    """Start each regressor at its label prior (the mean training label of its group, the overall
    mean for vanilla), so short runs spend their steps on features rather than on offsets."""
    with torch.no_grad():
        if model.classifier is None:
            model.experts.bias.fill_(float(np.mean(train_labels)))
        else:
            model.experts.bias.copy_(torch.as_tensor(group_centroids(train_labels, grouping)))


def check_finite(values: dict[str, float], epoch: int, step: int) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise TrainingError(f"loss term '{name}' is {value} at epoch {epoch + 1}, step {step}; "
                                f"stopping (try a lower lr or a higher temperature)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ============================ checkpoints, reports, artifacts ============================

def report(state: dict, rank: int, cfg: Config, net: DIRNet | None = None, optimizer=None,
           grouping: Grouping | None = None, labels=None) -> None:
    """Every worker calls this at the same points (`ray.train.report` is a barrier); rank 0 attaches
    the checkpoint: the training state, the best model in `groupdir eval`'s format, the history,
    and at the end the test results. A STOPPED state attaches only the reason."""
    import ray.train

    # For a sweep's scheduler and searcher: the latest epoch's validation metrics (NaN before the
    # first, e.g. a run stopped by a NaN loss) and the run's epoch count (its last epoch is not judged).
    latest = state["history"][-1] if state["history"] else {}
    metrics = {"epoch": state["epoch"], "epochs": cfg.epochs, "step": state["step"],
               f"val/{cfg.select_metric}": math.nan,
               **{key: value for key, value in latest.items() if key.startswith("val/")}}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="groupdir-ckpt-") as folder:
        folder = Path(folder)
        if STOPPED in state:
            (folder / STOPPED).write_text(json.dumps(state[STOPPED]))
        else:
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                        **{k: state[k] for k in ("epoch", "step", "history", "best_value", "best_epoch")}},
                       folder / STATE)
            save_checkpoint(folder / CHECKPOINT, state, cfg, grouping, labels)
            (folder / HISTORY).write_text(json.dumps(state["history"]))
            if "results" in state:
                (folder / RESULTS).write_text(json.dumps(state["results"]))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def restore(checkpoint, net: DIRNet, optimizer) -> dict:
    """The state to start from: fresh, or the latest checkpoint of a restarted or resumed run."""
    state = {"epoch": 0, "step": 0, "history": [], "best_value": math.inf, "best_epoch": 0, "best_val": {},
             "best_model": {}, "best_calibration": {}}
    if checkpoint is None:
        return state
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        if (folder / STOPPED).exists():
            return {**state, STOPPED: json.loads((folder / STOPPED).read_text())}
        saved = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        best = load_checkpoint(folder / CHECKPOINT)
    net.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state.update({k: saved[k] for k in ("epoch", "step", "history", "best_value", "best_epoch")})
    state.update(best_model=best["model"], best_val=best["val"], best_calibration=best["calibration"])
    return state


def save_checkpoint(path: Path, state: dict, cfg: Config, grouping: Grouping, train_labels) -> None:
    """The best-on-validation model in `groupdir eval`'s format, with the calibration chosen for it."""
    saved = {"model": state["best_model"], "calibration": state["best_calibration"], "config": cfg.to_dict(),
             "group_edges": list(grouping.edges),
             "train_labels": torch.as_tensor(np.asarray(train_labels), dtype=torch.float64),
             "epoch": state["best_epoch"], "val": state["best_val"], "version": __version__}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a truncated checkpoint behind


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} not found") from None
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise TrainingError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from err


def log_final_artifacts(logger, cfg: Config, results: dict, outputs: Outputs, train_labels, grouping: Grouping,
                        state: dict) -> None:
    """Rank 0: the test shot table, the plots of the selected route, the config, meta.json and the
    best checkpoint."""
    from groupdir import plots

    selected = results["selected_route"]
    value, groups = route_values(outputs, grouping, train_labels, Calibration.from_dict(state["best_calibration"]))[selected]
    figures = {"per_label_mae": plots.per_label_error(value, outputs.target, train_labels, cfg.label_bin_width),
               "predicted_vs_true": plots.predicted_vs_true(value, outputs.target, selected)}
    if outputs.logits is not None:
        figures["group_confusion"] = plots.group_confusion(groups, grouping.assign(outputs.target), grouping.num_groups)
    with tempfile.TemporaryDirectory(prefix="groupdir-artifacts-") as folder:
        best = Path(folder) / CHECKPOINT
        save_checkpoint(best, state, cfg, grouping, train_labels)
        files = [best] + ([Path(cfg.data) / META] if is_shards_dir(cfg.data) else [])
        logger.log_final(results, cfg.to_dict(), format_shot_table({cfg.method: results}), figures, files)


def inject_failure(marker: Path) -> None:
    """fail_at_step: the process dies as a crashed worker would, once per run (the marker remembers)."""
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("a worker was killed here on purpose (fail_at_step)\n")
    say(f"fail_at_step: killing this worker (pid {os.getpid()}) on purpose")
    os._exit(1)


def say(line: str) -> None:
    """A progress line from a worker. Ray Train routes print() through logging (and can show it twice);
    the process's own stdout reaches the driver's terminal once."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def evaluate_checkpoint(path: str | Path, data: str, split: str = "test", batch_size: int | None = None,
                        device: str | None = None) -> dict:
    """`groupdir eval`: the checkpoint's model on a split of a data root, every route, with the
    calibration chosen on validation when it was trained; one process."""
    state = load_checkpoint(path)
    if "calibration" not in state:
        raise TrainingError(f"checkpoint {path} has no route calibration (it predates groupdir "
                            f"{__version__}); train it again")
    cfg = load_config(overrides={**state["config"], "data": str(data),
                                 **({"batch_size": batch_size} if batch_size else {})})
    model = DIRNet(cfg.backbone, cfg.num_groups, grouped=cfg.method == "groupdir")
    model.load_state_dict(state["model"])
    target_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(target_device)
    loader = open_data(cfg, [split], augmented=None)[1][split]
    outputs = predict(model, loader, target_device)
    return route_metrics(outputs, Grouping(tuple(state["group_edges"])), state["train_labels"].numpy(), cfg,
                         Calibration.from_dict(state["calibration"]))
