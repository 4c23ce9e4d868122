"""`groupdir tune`: Ray Tune sweeps over any config key, every trial an MLflow run under one parent.

A search space is a YAML file (tune/*.yaml): `fixed` config keys for every trial, and a `space` of
keys to search, each one of choice / grid / uniform / loguniform / int. Each trial is `run_trial`,
a Tune function that builds a TorchTrainer for its config (Ray Train V2's pattern) with Tune's
report callback, so every epoch's validation metrics reach the ASHA scheduler (which stops trials
that fall behind) and the Optuna searcher. A trial trains through `train_run`, the same code as
`groupdir train`, into its own MLflow child run; the driver marks trials stopped early or failed,
and at the end puts the best trial, a table of all trials and a plot of each parameter against the
metric on the sweep's parent run.

A sweep folder (runs/sweeps/NAME) holds:
  sweep.json        the parent run id, the space and the config, which --resume checks
  tune/             Ray Tune's experiment state (what Tuner.restore reads)
  ray/              Ray Train's checkpoints, one folder per trial
  trials/TRIAL_ID/  each trial's checkpoint.pt (best on validation), history.json, results.json
  trials.csv, summary.json   the outcome, written when every trial has ended
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from groupdir.atomic import write_json_atomic
from groupdir.config import Config, load_config, parse_overrides
from groupdir.errors import ConfigError, GroupingError

KINDS = ("choice", "grid", "uniform", "loguniform", "int")
SPACE_FILE_KEYS = ("description", "trials", "seed", "asha", "fixed", "space")
# Where and how a trial runs, and what it is judged by: the same for every trial of a sweep.
NOT_SEARCHABLE = ("data", "dataset", "csv", "address", "storage_path", "tracking_uri", "experiment",
                  "select_metric", "workers", "cpus_per_worker", "gpus_per_worker", "device", "placement")
RECORD = "sweep.json"
RESUME_MAY_CHANGE = ("address", "max_failures")
TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes: a Python process with torch imported


@dataclass
class Param:
    key: str
    kind: str       # one of KINDS
    values: list    # choice / grid: the values; uniform / loguniform / int: [low, high], both included

    def domain(self):
        from ray import tune

        low, high = (self.values + [None, None])[:2]
        return {"choice": lambda: tune.choice(self.values), "grid": lambda: tune.grid_search(self.values),
                "uniform": lambda: tune.uniform(low, high), "loguniform": lambda: tune.loguniform(low, high),
                "int": lambda: tune.randint(low, high + 1)}[self.kind]()

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.values))})"


@dataclass
class SweepSpec:
    """A search space file plus the command line's sweep options."""
    space_file: str
    name: str
    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    trials: int = 8             # samples drawn; with a grid, runs of the whole grid (default 1)
    seed: int = 0               # the searcher's seed (the training seed is the config key `seed`)
    grace_period: int = 1       # ASHA: epochs every trial gets before it may be stopped; 0: no ASHA
    reduction_factor: float = 2.0
    max_concurrent: int = 0     # trials at once; 0: as many as the cluster's CPUs (GPUs) hold

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params if p.kind == "grid")

    @property
    def total_trials(self) -> int:
        return self.trials * self.grid_size

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "params": {p.key: p.describe() for p in self.params}}


# ===================================== search spaces =====================================

def load_space(path: str | Path, name: str = "", trials: int | None = None,
               max_concurrent: int | None = None) -> SweepSpec:
    """Read and check the shape of a space file (the values are checked against the config by
    `sweep_config`)."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read search space {path}: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a search space is a mapping with keys {', '.join(SPACE_FILE_KEYS)}")
    unknown = sorted(set(loaded) - set(SPACE_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(SPACE_FILE_KEYS)}")
    space, fixed = loaded.get("space") or {}, loaded.get("fixed") or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: 'space' must map at least one config key to a search domain")
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: 'fixed' must map config keys to values")
    asha = loaded.get("asha", {})
    if asha is False:
        asha = {"grace_period": 0}
    if not isinstance(asha, dict) or set(asha) - {"grace_period", "reduction_factor"}:
        raise ConfigError(f"{path}: 'asha' takes grace_period and reduction_factor (or false for no early stopping)")
    params = [_param(path, key, domain) for key, domain in space.items()]
    default_trials = 1 if any(p.kind == "grid" for p in params) else 8  # a grid runs once unless asked
    spec = SweepSpec(space_file=str(path), name=name or path.stem, params=params,
                     fixed=fixed, description=str(loaded.get("description", "")),
                     trials=trials if trials is not None else loaded.get("trials", default_trials), seed=loaded.get("seed", 0),
                     grace_period=asha.get("grace_period", 1), reduction_factor=asha.get("reduction_factor", 2.0),
                     max_concurrent=max_concurrent or 0)
    for key, value, least in (("trials", spec.trials, 1), ("seed", spec.seed, 0),
                              ("asha.grace_period", spec.grace_period, 0), ("max_concurrent", spec.max_concurrent, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{path}: {key}={value!r} must be an integer >= {least}")
    if not isinstance(spec.reduction_factor, (int, float)) or spec.reduction_factor <= 1:
        raise ConfigError(f"{path}: asha.reduction_factor={spec.reduction_factor!r} must be a number > 1")
    return spec


def _param(path: Path, key: str, domain) -> Param:
    where = f"{path}: space.{key}"
    if not isinstance(domain, dict) or len(domain) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)}, e.g. {{choice: [5, 10]}}")
    (kind, values), = domain.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list")
    if kind in ("choice", "grid"):
        return Param(key, kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} needs [low, high], two numbers")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}: int needs integer bounds")
    if low > high or (kind != "int" and low == high):
        raise ConfigError(f"{where}: low={low} must be below high={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0")
    return Param(key, kind, [low, high])


def sweep_config(spec: SweepSpec, overrides: list[str]) -> Config:
    """The config every trial starts from: defaults <- the space's `fixed` <- key=value; then every
    value the space can draw is checked against it, so a bad space fails before Ray starts."""
    command_line = parse_overrides(overrides)
    try:
        base = load_config(overrides={**spec.fixed, **command_line})
    except ConfigError as err:
        raise ConfigError(f"{spec.space_file} (fixed) with the command line: {err}") from None
    known = set(base.to_dict())
    for param in spec.params:
        where = f"{spec.space_file}: space.{param.key}"
        if param.key not in known:
            raise ConfigError(f"{where}: unknown config key {param.key!r}")
        if param.key in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: {param.key} is the same for every trial; set it in 'fixed' or "
                              f"on the command line")
        if param.key in spec.fixed or param.key in command_line:
            raise ConfigError(f"{where}: {param.key} is both searched and fixed "
                              f"({'in fixed' if param.key in spec.fixed else 'on the command line'}); drop one")
        kind_of_key = type(getattr(base, param.key))
        if param.kind == "int" and kind_of_key is not int:
            raise ConfigError(f"{where}: int ranges are for integer keys; {param.key} is {kind_of_key.__name__}")
        if param.kind in ("uniform", "loguniform") and kind_of_key is not float:
            raise ConfigError(f"{where}: {param.kind} is for real-valued keys; {param.key} is "
                              f"{kind_of_key.__name__} (use int or choice)")
    list(candidates(spec, base))  # building each candidate validates it
    return base


def candidates(spec: SweepSpec, base: Config):
    """(param, value, config) for each choice and both ends of each range: the configs that show a
    bad space. A value the config refuses raises, naming the file and the key."""
    for param in spec.params:
        for value in param.values:
            try:
                yield param, value, load_config(overrides={**base.to_dict(), param.key: value})
            except ConfigError as err:
                raise ConfigError(f"{spec.space_file}: space.{param.key}: the value {value!r} is refused: {err}") from None


# ======================================== driver =========================================

def run_sweep(spec: SweepSpec, cfg: Config, sweep_dir: str | Path, resume: bool = False) -> dict:
    """Run (or resume) the sweep; returns the summary, also written to the sweep folder."""
    import ray.tune

    from groupdir import tracking
    from groupdir.train import fit_resources, preflight, ray_session, resolve_paths

    sweep_dir = Path(sweep_dir).resolve()
    cfg = resolve_paths(cfg)
    dataset = preflight(cfg)
    for param, value, candidate in candidates(spec, cfg):  # e.g. more groups than the labels allow
        try:
            preflight(candidate)
        except (ConfigError, GroupingError) as err:
            raise ConfigError(f"{spec.space_file}: space.{param.key}: the value {value!r} is refused: {err}") from None
    tracking.check_reachable(cfg.tracking_uri)
    with ray_session(cfg.address):
        cfg, use_gpu, concurrent = fit_sweep_resources(cfg, spec)
        previous = claim_sweep_dir(sweep_dir, spec, cfg, resume)
        searched = {p.key for p in spec.params}
        parent_id = tracking.open_run(
            cfg.tracking_uri, cfg.experiment, spec.name,
            {**{k: v for k, v in cfg.to_dict().items() if k not in searched},
             **{f"space/{p.key}": p.describe() for p in spec.params},
             "sweep/space_file": spec.space_file, "sweep/trials": spec.total_trials, "sweep/seed": spec.seed,
             "sweep/asha": f"grace {spec.grace_period}, factor {spec.reduction_factor:g}" if spec.grace_period else "off",
             "sweep/max_concurrent": concurrent},
            {**tracking.provenance_tags(cfg, dataset), "kind": "sweep"},
            previous["mlflow_run_id"] if previous else "")
        write_json_atomic(sweep_dir / RECORD, {"mlflow_run_id": parent_id, "spec": spec.to_dict(),
                                               "config": cfg.to_dict()})
        metric = f"val/{cfg.select_metric}"
        print(f"sweep {spec.name}: {spec.total_trials} trials, up to {concurrent} at a time, "
              f"{cfg.workers} worker(s) x {cfg.cpus_per_worker:g} CPU{' + GPU' if use_gpu else ''} each; "
              f"{'grid' if spec.grid_size > 1 else f'Optuna (seed {spec.seed})'}; "
              + (f"ASHA on {metric} (grace {spec.grace_period} epoch(s), factor {spec.reduction_factor:g})"
                 if spec.grace_period else "no early stopping")
              + f"\nMLflow: parent run {parent_id}, experiment '{cfg.experiment}' at {cfg.tracking_uri}", flush=True)
        job = {"cfg": cfg, "use_gpu": use_gpu, "sweep_dir": str(sweep_dir), "parent_run_id": parent_id,
               "sweep": spec.name, "dataset": dataset}
        try:
            make_tuner(spec, cfg, job, concurrent, resume=previous is not None).fit()
            rows = trial_rows(cfg.tracking_uri, parent_id, cfg.select_metric, spec)
            ended = sum(row["status"] in ("FINISHED", "STOPPED_EARLY", "FAILED") for row in rows)
            if ended < spec.total_trials:  # Ctrl-C: Tune saved its state and returned early
                raise KeyboardInterrupt(f"{ended} of {spec.total_trials} trials ended")
            return summarize(cfg.tracking_uri, parent_id, cfg.select_metric, spec, rows, sweep_dir)
        except BaseException as err:
            mark_unfinished(cfg.tracking_uri, parent_id, interrupted=isinstance(err, KeyboardInterrupt))
            raise


def make_tuner(spec: SweepSpec, cfg: Config, job: dict, concurrent: int, resume: bool):
    """A new Tuner, or on resume the saved one (its searcher, scheduler and finished trials)."""
    import ray.tune

    # The trial function only waits on its TorchTrainer: it reserves memory, not the CPUs that the
    # trial's workers need (Tune refuses an empty request).
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, job=job),
                                        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    # A trial stopped by a NaN loss ends without validation metrics: Tune must not take that for a
    # misnamed metric (the trial fails, with its reason in MLflow).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    tune_path = Path(job["sweep_dir"]) / "tune"
    if resume and ray.tune.Tuner.can_restore(str(tune_path)):
        print("resuming: trials that ended are kept, the others go on from their last epoch", flush=True)
        return ray.tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True, resume_errored=False,
                                      restart_errored=False)
    metric = f"val/{cfg.select_metric}"
    return ray.tune.Tuner(
        trainable, param_space={p.key: p.domain() for p in spec.params},
        tune_config=tune_config(spec, cfg, metric, concurrent),
        run_config=ray.tune.RunConfig(name=tune_path.name, storage_path=str(tune_path.parent), verbose=0,
                                      failure_config=ray.tune.FailureConfig(max_failures=0),  # Train retries
                                      callbacks=[TrialProgress(cfg.tracking_uri, job["parent_run_id"], metric,
                                                               cfg.epochs)]))


def tune_config(spec: SweepSpec, cfg: Config, metric: str, concurrent: int):
    """Optuna (seeded) over the space, or Tune's grid/random generator when the space has a grid
    (Optuna has no grid); ASHA over epochs."""
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial
    if spec.grid_size > 1:  # Tune applies max_concurrent_trials to a Searcher, not to this generator
        searcher, limit = BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrent), None
    else:
        searcher, limit = OptunaSearch(seed=spec.seed), concurrent
    max_epochs = max([cfg.epochs] + [v for p in spec.params if p.key == "epochs" for v in p.values])
    # Rungs sit strictly before the last epoch (max_t = epochs - 1, and no stop at max_t): a trial
    # that reached its last epoch always gets its test evaluation.
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max(max_epochs - 1, 1), grace_period=spec.grace_period,
                               reduction_factor=spec.reduction_factor, stop_last_trials=False)
                 if spec.grace_period and spec.grace_period < max_epochs else FIFOScheduler())
    return ray.tune.TuneConfig(metric=metric, mode="min", search_alg=searcher, scheduler=scheduler,
                               num_samples=spec.trials, max_concurrent_trials=limit)


def fit_sweep_resources(cfg: Config, spec: SweepSpec) -> tuple[Config, bool, int]:
    """How many trials run at once (max_concurrent, else as many as the GPUs, or the CPUs at one per
    worker, hold) and the CPUs each worker gets (cpus_per_worker, else the CPUs shared out among the
    concurrent trials' workers): the machine is used whole and never oversubscribed."""
    import ray

    from groupdir.train import fit_resources

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    use_gpu = gpus > 0 if cfg.device == "auto" else cfg.device == "cuda"
    concurrent = spec.max_concurrent
    if not concurrent:
        holds = gpus // (cfg.workers * cfg.gpus_per_worker) if use_gpu else cpus // (cfg.workers * (cfg.cpus_per_worker or 1))
        concurrent = int(max(1, min(holds, spec.total_trials)))
    if not cfg.cpus_per_worker:
        share = 1 if cfg.address else max(1, int(cpus // (concurrent * cfg.workers)))
        cfg = dataclasses.replace(cfg, cpus_per_worker=float(share))
    cfg, use_gpu = fit_resources(cfg)  # refuses a trial that cannot fit at all
    return cfg, use_gpu, concurrent


def claim_sweep_dir(sweep_dir: Path, spec: SweepSpec, cfg: Config, resume: bool) -> dict | None:
    """A new sweep needs a new folder; --resume needs the same space and config as before."""
    record_file = sweep_dir / RECORD
    if not resume:
        if record_file.exists():
            raise FileExistsError(f"{sweep_dir} already holds a sweep; pass --resume to continue it, "
                                  f"or pick another --name")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return None
    if not record_file.exists():
        raise FileNotFoundError(f"--resume: no sweep in {sweep_dir} ({RECORD} is missing)")
    record = json.loads(record_file.read_text())
    changed = [key for key, value in spec.to_dict().items()
               if record["spec"].get(key) != value and key != "space_file"]
    changed += [key for key, value in cfg.to_dict().items()
                if record["config"].get(key) != value and key not in RESUME_MAY_CHANGE]
    if changed:
        raise ConfigError(f"--resume: {sweep_dir} was started with other settings ({', '.join(sorted(changed))}); "
                          f"resume it with the same space, options and key=value arguments")
    return record


def mark_unfinished(uri: str, parent_id: str, interrupted: bool) -> None:
    """A sweep that stopped before its end: its running trials and the parent are KILLED when
    interrupted (--resume reopens them), FAILED otherwise."""
    from groupdir import tracking

    for run in tracking.child_runs(uri, parent_id):
        if run.info.status == "RUNNING":
            tracking.set_tags(uri, run.info.run_id, {"interrupted": "true"})
            tracking.finish_run(uri, run.info.run_id, "KILLED")
    tracking.finish_run(uri, parent_id, "KILLED" if interrupted else "FAILED")


# ====================================== one trial ========================================

def run_trial(params: dict, job: dict) -> None:
    """One trial, in its Tune actor: the sampled params over the sweep's config, trained by a
    TorchTrainer whose reports Tune's callback forwards to the scheduler."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from groupdir import tracking
    from groupdir.train import HISTORY, RESULTS, train_run

    trial_id = ray.tune.get_context().get_trial_id()
    params = {key: value.item() if hasattr(value, "item") else value for key, value in params.items()}  # numpy
    cfg = load_config(overrides={**job["cfg"].to_dict(), **params})
    run_dir = Path(job["sweep_dir"]) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    uri, parent_id = cfg.tracking_uri, job["parent_run_id"]
    existing = [run for run in tracking.child_runs(uri, parent_id) if run.data.tags.get("trial_id") == trial_id]
    if existing and existing[0].info.status == "FINISHED" and (run_dir / RESULTS).exists():
        # Finished before an interruption that Tune's saved state did not see: report, don't retrain.
        history = json.loads((run_dir / HISTORY).read_text())
        key = f"val/{cfg.select_metric}"
        ray.tune.report({"epoch": history[-1]["epoch"], key: min(record[key] for record in history)})
        return
    if existing:
        tracking.set_tags(uri, existing[0].info.run_id, {"interrupted": "false"})
    run_id = tracking.open_run(uri, cfg.experiment, trial_id, cfg.to_dict(),
                               {**tracking.provenance_tags(cfg, job["dataset"]), "mlflow.parentRunId": parent_id,
                                "sweep": job["sweep"], "trial_id": trial_id, "kind": "trial"},
                               existing[0].info.run_id if existing else "")
    train_run(cfg, job["use_gpu"], run_dir, str(Path(job["sweep_dir"]) / "ray"), f"train-trial_id={trial_id}",
              run_id, progress=False, callbacks=(TuneReportCallback(),), mark_failures=False)


class TrialProgress(Callback):
    """Driver side: one line per trial event, and the MLflow status of trials the trial itself could
    not finish (stopped early by ASHA, or whose actor died)."""

    def __init__(self, uri: str, parent_id: str, metric: str, epochs: int):
        self.uri, self.parent_id, self.metric, self.epochs = uri, parent_id, metric, epochs

    def on_trial_start(self, iteration, trials, trial, **info):
        settings = "  ".join(f"{key}={_short(value)}" for key, value in trial.config.items())
        print(f"  {trial.trial_id} started: {settings}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        run = self._run(trial.trial_id)
        epoch, value = result.get("epoch", 0), result.get(self.metric, math.nan)
        if run is not None and run.info.status == "RUNNING":  # ASHA stopped it: the trial cannot say so
            from groupdir import tracking

            tracking.set_tags(self.uri, run.info.run_id, {"stopped_early": f"ASHA after epoch {epoch}"})
            tracking.finish_run(self.uri, run.info.run_id, "KILLED")
            print(f"  {trial.trial_id} stopped early by ASHA after epoch {epoch}/{self.epochs}: "
                  f"{self.metric} {value:.3f}", flush=True)
        else:
            print(f"  {trial.trial_id} finished: {self.metric} {value:.3f} at epoch {epoch}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        from groupdir import tracking

        # Tune has just written the trial's traceback; the reason is its last "SomeError: ..." line.
        error_file = Path(trial.error_file) if trial.error_file else None
        trace = error_file.read_text() if error_file and error_file.exists() else ""
        raised = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception): .*)$", trace, flags=re.MULTILINE)
        reason = raised[-1] if raised else f"the trial's process died (see {error_file or 'its log'})"
        run = self._run(trial.trial_id)
        if run is not None:
            tracking.finish_run(self.uri, run.info.run_id, "FAILED", error=reason)
        print(f"  {trial.trial_id} FAILED: {reason[:300]}", flush=True)

    def _run(self, trial_id: str):
        from groupdir import tracking

        found = [run for run in tracking.child_runs(self.uri, self.parent_id) if run.data.tags.get("trial_id") == trial_id]
        return found[0] if found else None


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ======================================== summary ========================================

def trial_rows(uri: str, parent_id: str, select_metric: str, spec: SweepSpec) -> list[dict]:
    """One row per child run: its status, searched values, best validation metric, test metrics."""
    from groupdir import tracking

    client = tracking.mlflow_client(uri)
    rows = []
    for run in tracking.child_runs(uri, parent_id):
        history = client.get_metric_history(run.info.run_id, f"val/{select_metric}")
        status = run.info.status
        if status == "KILLED":
            status = "STOPPED_EARLY" if "stopped_early" in run.data.tags else "INTERRUPTED"
        values = [m.value for m in history if math.isfinite(m.value)]
        rows.append({"trial": run.data.tags.get("trial_id", ""), "run_id": run.info.run_id, "status": status,
                     "params": {p.key: yaml.safe_load(run.data.params[p.key]) for p in spec.params},
                     "best_val": min(values) if values else math.nan, "epochs": len({m.step for m in history}),
                     "test": {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}})
    return rows


def summarize(uri: str, parent_id: str, select_metric: str, spec: SweepSpec, rows: list[dict], sweep_dir: Path) -> dict:
    """The best finished trial (on validation) and every trial, onto the parent run and to disk."""
    from mlflow.entities import Metric, Param as MlflowParam

    from groupdir import plots, tracking

    client = tracking.mlflow_client(uri)
    metric = f"val/{select_metric}"
    finished = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row["best_val"])]
    best = min(finished, key=lambda row: row["best_val"]) if finished else None
    for row in rows:
        if math.isfinite(row["best_val"]) and f"best_{metric}" not in client.get_run(row["run_id"]).data.metrics:
            client.log_metric(row["run_id"], f"best_{metric}", row["best_val"])
    table = format_trials(rows, spec, select_metric)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("FINISHED", "STOPPED_EARLY", "FAILED")}
    summary = {"sweep": spec.name, "metric": metric, "mlflow_parent_run_id": parent_id, "trials": len(rows),
               **{k.lower(): v for k, v in counts.items()}, "best": best, "rows": rows}
    client.log_batch(parent_id, metrics=[Metric(f"trials/{k.lower()}", v, 0, 0) for k, v in counts.items()])
    if best:
        client.log_batch(parent_id, params=[MlflowParam(f"best/{k}", str(v)) for k, v in best["params"].items()],
                         metrics=[Metric(f"best/{metric}", best["best_val"], 0, 0)]
                         + [Metric(f"best/{k}", v, 0, 0) for k, v in best["test"].items()])
        tracking.set_tags(uri, parent_id, {"best_trial": best["trial"], "best_run_id": best["run_id"]})
    client.log_text(parent_id, table["markdown"], "trials.md")
    client.log_text(parent_id, table["csv"], "trials.csv")
    plotted = [row for row in rows if math.isfinite(row["best_val"])]
    if plotted:
        client.log_figure(parent_id, plots.params_vs_metric(plotted, {p.key: p.kind for p in spec.params}, select_metric),
                          "plots/params_vs_metric.png")
    (sweep_dir / "trials.csv").write_text(table["csv"])
    write_json_atomic(sweep_dir / "summary.json", summary)
    tracking.finish_run(uri, parent_id, "FINISHED" if best else "FAILED",
                        error="" if best else "no trial finished")
    return summary


def format_trials(rows: list[dict], spec: SweepSpec, select_metric: str) -> dict[str, str]:
    """The trials, best validation metric first: as Markdown (for people) and CSV (for tools)."""
    keys = [p.key for p in spec.params]
    header = ["trial", "status", *keys, f"best val {select_metric}", "epochs", "test mae/all", "test bmae/all"]
    ordered = sorted(rows, key=lambda row: (row["status"] != "FINISHED", _nan_last(row["best_val"])))
    body = [[row["trial"], row["status"].lower().replace("_", " "), *(_short(row["params"][k]) for k in keys),
             f"{row['best_val']:.3f}", str(row["epochs"]),
             *(f"{row['test'][k]:.3f}" if k in row["test"] else "" for k in ("test/mae/all", "test/bmae/all"))]
            for row in ordered]
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(line) + " |" for line in body]) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header + ["mlflow_run_id"])
    writer.writerows(line + [row["run_id"]] for line, row in zip(body, ordered))
    return {"markdown": markdown, "csv": buffer.getvalue()}


def _nan_last(value: float) -> float:
    return value if math.isfinite(value) else math.inf
