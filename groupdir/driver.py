"""The Ray Train driver: `train(cfg, run_dir)` runs one training run to its end.

    preflight   everything that can be refused before Ray starts (config, data, tracking store)
    resources   CPUs per worker, GPUs or not; a run the cluster cannot hold is refused
    run folder  a finished run is kept, an unfinished one with the same config is resumed
    trainer     a TorchTrainer runs recipe.train_worker on `workers` DDP ranks
    result      the final checkpoint's best model and results go to the run folder:
                checkpoint.pt (best on validation), history.json, plots/, results.json ("finished")
    publish     what MLflow does not hold yet goes to it from the run folder, and the run ends
                FINISHED; a tracking server that is away is waited for (tracking_patience), and a
                rerun of the same command sends it later

Fault tolerance: every epoch ends with a checkpoint; a failed worker makes Ray restart all workers
from the latest one, and the loaders replay that epoch's order. Rerunning the same command on the
same run folder after a driver crash does the same, and reopens the same MLflow run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from groupdir import checkpoint, recipe
from groupdir.atomic import copy_file_atomic, read_json, write_json_atomic
from groupdir.config import Config, changed_settings
from groupdir.data import train_labels
from groupdir.data.dir_format import resolve_csv
from groupdir.data.shards import META, check_shards_fit, is_shards_dir, read_meta
from groupdir.errors import ConfigError, TrainingError
from groupdir.methods import build_model
from groupdir.tracking import (Tracker, check_reachable, provenance_tags, publish_run, resolve_uri, run_params,
                               server_unreachable)

RUN_RECORD = "run.json"  # run folder: the MLflow run id, Ray's run name and the config, for resuming
WorkerLoop = Callable[[recipe.Job], None]


def train(cfg: Config, run_dir: str | Path, progress: str = "lines", force: bool = False,
          worker_loop: WorkerLoop = recipe.train_worker) -> dict:
    """Train on Ray (embedded or `cfg.address`), track in MLflow, write the run folder; returns the
    test results. progress: bar | lines | off (recipe.Job). `worker_loop`: what each worker runs
    (tests wrap the recipe to inject failures)."""
    run_dir = Path(run_dir).resolve()
    cfg = resolve_paths(cfg)
    dataset = preflight(cfg)
    check_reachable(cfg.tracking_uri)
    if not force and (run_dir / checkpoint.RESULTS).exists():
        return send_finished_run(cfg, run_dir)
    if cfg.address and cfg.tracking_uri.startswith("sqlite:"):
        print(f"note: on a multi-node cluster every node must see {cfg.tracking_uri} at that path; "
              f"otherwise run an MLflow server (docs/distributed.md: Run on a cluster)", flush=True)
    with ray_session(cfg.address):
        cfg, use_gpu = fit_resources(cfg)  # before anything is written: a refused run leaves no trace
        previous = claim_run_dir(run_dir, cfg, force)
        if previous:
            print(f"resuming the run in {run_dir} (MLflow run {previous['mlflow_run_id']})", flush=True)
        run_id = Tracker(cfg.tracking_uri).open_run(cfg.experiment, run_dir.name, run_params(cfg.to_dict(), dataset),
                                                    provenance_tags(cfg, dataset),
                                                    previous["mlflow_run_id"] if previous else "")
        if not previous:
            Tracker(cfg.tracking_uri).log_data(run_id, **training_data(cfg, dataset))
        # Ray keeps the checkpoints in storage/ray_name; a new name for every fresh run, so that runs
        # sharing a storage_path (or a run started over with --force) never pick up another's.
        ray_name = previous["ray_name"] if previous else f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        write_json_atomic(run_dir / RUN_RECORD, {"mlflow_run_id": run_id, "ray_name": ray_name,
                                                 "config": cfg.to_dict()})
        storage = cfg.storage_path or str(run_dir / "ray")
        results = train_run(cfg, use_gpu, run_dir, storage, ray_name, run_id, progress, worker_loop=worker_loop)
    drop_ray_checkpoints(storage, ray_name)
    return results


def drop_ray_checkpoints(storage: str, ray_name: str) -> None:
    """Ray's per-epoch checkpoints of a finished run: only a restart needs them, and the run folder
    holds the chosen model. They are the run's bulk (model and optimizer state, twice). An object
    store (s3://...) keeps them: Ray's own storage settings decide there."""
    if "://" not in storage:
        shutil.rmtree(Path(storage) / ray_name, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(storage).rmdir()  # left only if another run keeps its checkpoints there


def train_run(cfg: Config, use_gpu: bool, run_dir: Path, storage: str, ray_name: str, run_id: str,
              progress: str, callbacks: tuple = (), mark_failures: bool = True,
              worker_loop: WorkerLoop = recipe.train_worker) -> dict:
    """One training run to its end, in a connected Ray session: the TorchTrainer, then the run folder
    and the MLflow run's status. Shared by `train` and every sweep trial; returns the test results.
    A sweep trial passes mark_failures=False: only the sweep's driver can tell a failure from a
    trial that Tune tears down (stopped early, or the sweep interrupted)."""
    tracker = Tracker(cfg.tracking_uri)
    try:
        final = run_trainer(cfg, use_gpu, run_dir, storage, ray_name, recipe.Job(cfg, run_id, progress),
                            callbacks, worker_loop)
    except BaseException as err:
        if mark_failures:
            interrupted = isinstance(err, KeyboardInterrupt)
            tracker.finish_run(run_id, "KILLED" if interrupted else "FAILED",
                               error="" if interrupted else f"{type(err).__name__}: {err}")
        raise
    write_json_atomic(run_dir / checkpoint.HISTORY, final["history"])
    write_json_atomic(run_dir / checkpoint.RESULTS, final["results"])  # last: its presence means "finished"
    publish(cfg, run_id, run_dir)
    return final["results"]


def publish(cfg: Config, run_id: str, run_dir: Path) -> bool:
    """The finished run folder to MLflow (tracking.publish_run), waiting up to tracking_patience
    seconds for a server that does not answer; False if it never did (the run folder is complete,
    and rerunning the command sends it)."""
    extra = (Path(cfg.data) / META,) if is_shards_dir(cfg.data) else ()
    deadline, said = time.monotonic() + cfg.tracking_patience, False
    while True:
        try:
            publish_run(Tracker(cfg.tracking_uri), run_id, run_dir, cfg.to_dict(), extra)
            return True
        except Exception as err:
            if not server_unreachable(err):
                raise
            if time.monotonic() >= deadline:
                print(f"warning: MLflow at {cfg.tracking_uri} does not answer; the run is complete in {run_dir}. "
                      f"Rerun the same command when the server is back to send it to MLflow.", flush=True)
                return False
            if not said:
                print(f"MLflow at {cfg.tracking_uri} does not answer; the results are in {run_dir}; trying to "
                      f"send them for up to {cfg.tracking_patience:g} s", flush=True)
                said = True
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def send_finished_run(cfg: Config, run_dir: Path) -> dict:
    """A finished run folder named again: if its MLflow run was left unfinished (the server was away
    at the end), send it now; otherwise refuse (pick another --out, or --force)."""
    record = json.loads((run_dir / RUN_RECORD).read_text())
    if Tracker(cfg.tracking_uri).run(record["mlflow_run_id"]).info.status == "FINISHED":
        raise FileExistsError(f"{run_dir} already holds a finished run; pick another --out or pass --force")
    print(f"{run_dir} holds a finished run that MLflow does not have whole; sending it", flush=True)
    if not publish(cfg, record["mlflow_run_id"], run_dir):
        raise TrainingError(f"MLflow at {cfg.tracking_uri} still does not answer; {run_dir} is complete")
    return read_json(run_dir / checkpoint.RESULTS)


def run_trainer(cfg: Config, use_gpu: bool, run_dir: Path, storage: str, ray_name: str, job: recipe.Job,
                callbacks: tuple, worker_loop: WorkerLoop) -> dict:
    """One Ray Train run; copies the best model to the run folder and returns the results and
    history of the final checkpoint. `callbacks`: Ray Train callbacks (a sweep trial passes Tune's,
    which forwards every report to the Tune scheduler)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.placement),
        run_config=ray.train.RunConfig(
            name=ray_name, storage_path=storage, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # The console gets Ray Train's errors only; its session folder's log files keep everything.
            logging_config=ray.train.LoggingConfig(log_level="ERROR")))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainingError(f"training failed after {cfg.max_failures} restart(s): {worker_error(err)}") from None
    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        if (folder / checkpoint.STOPPED).exists():
            raise TrainingError(json.loads((folder / checkpoint.STOPPED).read_text())["message"])
        copy_file_atomic(folder / checkpoint.CHECKPOINT, run_dir / checkpoint.CHECKPOINT)
        for path in [folder / checkpoint.UNSENT_STEPS, *sorted((folder / checkpoint.PLOTS).glob("*.png"))]:
            if path.exists():
                (run_dir / path.relative_to(folder)).parent.mkdir(exist_ok=True)
                copy_file_atomic(path, run_dir / path.relative_to(folder))
        return {"results": json.loads((folder / checkpoint.RESULTS).read_text()),
                "history": json.loads((folder / checkpoint.HISTORY).read_text())}


# ================================ before the trainer starts ===============================

def resolve_paths(cfg: Config) -> Config:
    """Paths made absolute, since Ray workers run in other folders (or on other nodes)."""
    return cfg.replace(data=str(Path(cfg.data).resolve()) if cfg.data else "",
                       init_from=str(Path(cfg.init_from).resolve()) if cfg.init_from else "",
                       storage_path=local_absolute(cfg.storage_path), tracking_uri=resolve_uri(cfg.tracking_uri))


def preflight(cfg: Config) -> str:
    """Everything that can be refused before Ray starts; returns the data set's name."""
    if not cfg.data:
        raise ConfigError("no data: pass --data DATA (FFCV shards or a DIR data root)")
    labels = train_labels(cfg)
    recipe.supervision(cfg, labels)  # raises on more groups than labels, a bad LDS setting
    try:
        net = build_model(cfg, labels)  # FDS's label bins and Balanced MSE's GMM come from the training labels
    except ValueError as err:
        raise ConfigError(f"method={cfg.method}{' fds=true' if cfg.fds else ''} on these training labels: {err}") from None
    if cfg.init_from:
        checkpoint.load_encoder(net, cfg.init_from, cfg.backbone)  # a checkpoint whose encoder fits this model
    if len(labels) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(labels)} training rows: no full batch")
    if is_shards_dir(cfg.data):
        meta = read_meta(cfg.data)
        check_shards_fit(meta, cfg.workers, cfg.batch_size)
        return meta["dataset"]
    return resolve_csv(cfg.data, cfg.dataset, cfg.csv).stem  # as `prepare` names the shards made from it


def training_data(cfg: Config, dataset: str) -> dict:
    """The training data as MLflow records it (Tracker.log_data, the runs table's Dataset column):
    its name, the digest of its label CSV (the same for a data root and the shards made from it)
    and where it is."""
    if is_shards_dir(cfg.data):
        digest = read_meta(cfg.data)["source_csv_sha256"]
    else:
        digest = hashlib.sha256(resolve_csv(cfg.data, cfg.dataset, cfg.csv).read_bytes()).hexdigest()
    return {"name": dataset, "digest": digest[:12], "source": cfg.data}


def claim_run_dir(run_dir: Path, cfg: Config, force: bool) -> dict | None:
    """A run is started over when `force`; an unfinished one with the same config is resumed.
    Returns the run record to resume from, or None for a fresh run."""
    record_file = run_dir / RUN_RECORD
    if force:
        for name in (checkpoint.CHECKPOINT, checkpoint.RESULTS, checkpoint.HISTORY, checkpoint.UNSENT_STEPS, RUN_RECORD):
            (run_dir / name).unlink(missing_ok=True)
        for folder in ("ray", checkpoint.PLOTS):
            shutil.rmtree(run_dir / folder, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not record_file.exists():
        return None
    record = json.loads(record_file.read_text())
    changed = changed_settings(record["config"], cfg.to_dict())
    if changed:
        raise ConfigError(f"{run_dir} holds an unfinished run with other settings ({', '.join(changed)}); "
                          f"rerun with the same settings to resume it, or pass --force to start over")
    return record


@contextlib.contextmanager
def ray_session(address: str = "", num_cpus: int | None = None):
    """Connect to `address`, or start an embedded local Ray that stops on leaving; an already
    connected session (a test's, the demo's) is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    # The console shows groupdir's lines, rank 0's progress bar and Ray's errors only; Ray's own logs
    # stay in its session folder (/tmp/ray/session_latest/logs). Ray Train turns a worker's print()
    # into a log record, which would swallow the progress bar's updates (Ray's tqdm prints them for
    # the driver to draw). On one machine nothing can be preempted, and Ray Train's preemption
    # watcher only adds an internal error line to the console; on a cluster it stays on. The dashboard
    # stays on although it costs start-up time: Ray Train's placement-group cleaner needs it, and
    # without it a trial that Tune stops keeps its CPUs, so the next trial never starts.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **({} if address else {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"})}
    ray.init(address=address or None, num_cpus=None if address else num_cpus, logging_level=logging.ERROR,
             runtime_env={"env_vars": env_vars})
    try:
        yield
    finally:
        ray.shutdown()


def fit_resources(cfg: Config, runs_at_once: int = 1) -> tuple[Config, bool]:
    """The config with cpus_per_worker resolved, and whether to train on GPUs (device=auto: when the
    cluster has any). cpus_per_worker=0 shares the local Ray's CPUs out among `runs_at_once` runs'
    workers (1 on a cluster joined by address, which may grow). A run that cannot fit is refused (Ray
    would wait for resources forever), unless the cluster may grow."""
    import ray

    cluster = ray.cluster_resources()
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    if not cfg.cpus_per_worker:
        share = 1.0 if cfg.address else float(max(1, int(cpus // (runs_at_once * cfg.workers))))
        cfg = cfg.replace(cpus_per_worker=share)
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
