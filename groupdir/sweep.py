"""`groupdir tune`: Ray Tune sweeps over any config key, every trial an MLflow run under one parent.

A search space is a YAML file (tune/*.yaml): `fixed` config keys for every trial, and a `space` of
keys to search, each one of choice / grid / uniform / loguniform / int. A choice (or grid) may also
be a mapping of named bundles of keys that only make sense together, e.g.
`contrast: {choice: {paper: {similarity: cosine, temperature: 2.5}, authors: {...}}}`: the searcher
draws a name, the trial gets the bundle's keys, and MLflow records the name as the param `contrast`. Each trial is `run_trial`,
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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from groupdir.atomic import write_json_atomic
from groupdir.config import Config, load_config, parse_overrides, parse_value
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
    bundles: dict[str, dict] | None = None  # a choice of named bundles: name -> {config key: value}

    def settings(self, value) -> dict:
        """The config keys a drawn value stands for."""
        return dict(self.bundles[value]) if self.bundles else {self.key: value}

    def domain(self):
        from ray import tune

        if self.kind in ("choice", "grid"):
            return tune.choice(self.values) if self.kind == "choice" else tune.grid_search(self.values)
        low, high = self.values
        if self.kind == "int":
            return tune.randint(low, high + 1)  # Tune's upper bound is exclusive
        return tune.uniform(low, high) if self.kind == "uniform" else tune.loguniform(low, high)

    def describe(self) -> str:
        if self.bundles:
            return f"{self.kind}(" + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in bundle.items())
                                               for name, bundle in self.bundles.items()) + ")"
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
    if kind in ("choice", "grid") and isinstance(values, dict) and values:
        if not all(isinstance(bundle, dict) and bundle for bundle in values.values()):
            raise ConfigError(f"{where}: a {kind} of bundles maps each name to a mapping of config keys")
        return Param(key, kind, [str(name) for name in values], {str(k): v for k, v in values.items()})
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list (or a mapping of named bundles)")
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
    searched: set[str] = set()
    for param in spec.params:
        where = f"{spec.space_file}: space.{param.key}"
        if param.bundles and param.key in known:
            raise ConfigError(f"{where}: a bundle's name must not be a config key; name it after what it bundles")
        keys = sorted({k for bundle in param.bundles.values() for k in bundle}) if param.bundles else [param.key]
        for key in keys:
            if key not in known:
                raise ConfigError(f"{where}: unknown config key {key!r}")
            if key in NOT_SEARCHABLE:
                raise ConfigError(f"{where}: {key} is the same for every trial; set it in 'fixed' or "
                                  f"on the command line")
            if key in spec.fixed or key in command_line:
                raise ConfigError(f"{where}: {key} is both searched and fixed "
                                  f"({'in fixed' if key in spec.fixed else 'on the command line'}); drop one")
            if key in searched:
                raise ConfigError(f"{where}: {key} is searched twice")
            searched.add(key)
        if param.bundles:
            continue
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
                yield param, value, load_config(overrides={**base.to_dict(), **param.settings(value)})
            except ConfigError as err:
                raise refused(spec, param, value, err) from None


def refused(spec: SweepSpec, param: Param, value, err: Exception) -> ConfigError:
    return ConfigError(f"{spec.space_file}: space.{param.key}: the value {value!r} is refused: {err}")


# ======================================== driver =========================================

def run_sweep(spec: SweepSpec, cfg: Config, sweep_dir: str | Path, resume: bool = False) -> dict:
    """Run (or resume) the sweep; returns the summary, also written to the sweep folder."""
    from groupdir import tracking
    from groupdir.train import preflight, ray_session, resolve_paths

    sweep_dir = Path(sweep_dir).resolve()
    cfg = resolve_paths(cfg)
    dataset = preflight(cfg)
    for param, value, candidate in candidates(spec, cfg):  # e.g. more groups than the labels allow
        try:
            preflight(candidate)
        except (ConfigError, GroupingError) as err:
            raise refused(spec, param, value, err) from None
    tracking.check_reachable(cfg.tracking_uri)
    previous = claim_sweep_dir(sweep_dir, spec, cfg, resume)
    given = cfg.to_dict()
    with ray_session(cfg.address):
        cfg, use_gpu, concurrent = fit_sweep_resources(cfg, spec)
        searched = {key for p in spec.params for value in p.values for key in p.settings(value)}
        parent_id = tracking.open_run(
            cfg.tracking_uri, cfg.experiment, spec.name,
            {**{k: v for k, v in cfg.to_dict().items() if k not in searched},
             **{f"space/{p.key}": p.describe() for p in spec.params},
             "sweep/space_file": spec.space_file, "sweep/trials": spec.total_trials, "sweep/seed": spec.seed,
             "sweep/asha": f"grace {spec.grace_period}, factor {spec.reduction_factor:g}" if spec.grace_period else "off",
             "sweep/max_concurrent": concurrent},
            {**tracking.provenance_tags(cfg, dataset), "kind": "sweep"},
            previous["mlflow_run_id"] if previous else "")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(sweep_dir / RECORD, {"mlflow_run_id": parent_id, "spec": spec.to_dict(),
                                               "config": given})
        if previous:
            mark_running_trials_interrupted(cfg.tracking_uri, parent_id)
        metric = f"val/{cfg.select_metric}"
        print(f"sweep {spec.name}: {spec.total_trials} trials, up to {concurrent} at a time, "
              f"{cfg.workers} worker(s) x {cfg.cpus_per_worker:g} CPU{' + GPU' if use_gpu else ''} each; "
              f"{'grid' if spec.grid_size > 1 else f'Optuna (seed {spec.seed})'}; "
              + (f"ASHA on {metric} (grace {spec.grace_period} epoch(s), factor {spec.reduction_factor:g})"
                 if spec.grace_period else "no early stopping")
              + f"\nMLflow: parent run {parent_id}, experiment '{cfg.experiment}' at {cfg.tracking_uri}", flush=True)
        job = {"cfg": cfg, "use_gpu": use_gpu, "sweep_dir": str(sweep_dir), "parent_run_id": parent_id,
               "sweep": spec.name, "dataset": dataset, "params": spec.params}
        try:
            results = make_tuner(spec, cfg, job, concurrent, resume=previous is not None).fit()
            ended = results.num_terminated + results.num_errors
            if ended < spec.total_trials:  # Ctrl-C: Tune saved its state and returned early
                raise KeyboardInterrupt(f"{ended} of {spec.total_trials} trials ended")
            rows = trial_rows(cfg.tracking_uri, parent_id, cfg.select_metric, spec)
            return summarize(cfg.tracking_uri, parent_id, cfg.select_metric, spec, rows, sweep_dir)
        except BaseException as err:
            mark_unfinished(cfg.tracking_uri, parent_id, interrupted=isinstance(err, KeyboardInterrupt))
            raise


def make_tuner(spec: SweepSpec, cfg: Config, job: dict, concurrent: int, resume: bool):
    """A new Tuner, or on resume the saved one (its searcher and the trials' states)."""
    import ray.tune

    from groupdir import tracking

    # The trial function only waits on its TorchTrainer: it reserves memory, not the CPUs that the
    # trial's workers need (Tune refuses an empty request).
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, job=job),
                                        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    tune_path = Path(job["sweep_dir"]) / "tune"
    if resume:
        if ray.tune.Tuner.can_restore(str(tune_path)):
            print("resuming: trials that ended are kept, the others go on from their last epoch", flush=True)
            return ray.tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True,
                                          resume_errored=False, restart_errored=False)
        if tracking.child_runs(cfg.tracking_uri, job["parent_run_id"]):
            raise ConfigError(f"--resume: Ray Tune saved no state in {tune_path} before the sweep stopped, so its "
                              f"trials cannot be matched to their MLflow runs; start the sweep again under another --name")
    metric = f"val/{cfg.select_metric}"
    return ray.tune.Tuner(
        trainable, param_space={p.key: p.domain() for p in spec.params},
        tune_config=tune_config(spec, cfg, metric, concurrent),
        run_config=ray.tune.RunConfig(name=tune_path.name, storage_path=str(tune_path.parent), verbose=0,
                                      failure_config=ray.tune.FailureConfig(max_failures=0),  # Train retries
                                      callbacks=[TrialProgress(cfg.tracking_uri, cfg.experiment, job["parent_run_id"],
                                                               metric)]))


class ASHABeforeLastEpoch(ASHAScheduler):
    """ASHA that never judges a trial's last epoch: that report also carries the test evaluation,
    which a stop would throw away. (It also covers `epochs` searched, and a resumed sweep, whose
    scheduler starts with empty rungs.)"""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("epoch", 0) >= result.get("epochs", math.inf):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def tune_config(spec: SweepSpec, cfg: Config, metric: str, concurrent: int):
    """Optuna (seeded) over the space, or Tune's grid/random generator when the space has a grid
    (Optuna has no grid); ASHA over epochs."""
    import optuna
    import ray.tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial
    if spec.grid_size > 1:  # Tune applies max_concurrent_trials to a Searcher, not to this generator
        searcher, limit = BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrent), None
    else:
        searcher, limit = OptunaSearch(seed=spec.seed), concurrent
    epochs = max([cfg.epochs] + [v for p in spec.params if p.key == "epochs" for v in p.values])
    scheduler = (ASHABeforeLastEpoch(time_attr="epoch", max_t=epochs, grace_period=spec.grace_period,
                                     reduction_factor=spec.reduction_factor, stop_last_trials=False)
                 if spec.grace_period and spec.grace_period < epochs else FIFOScheduler())
    # A trial stopped by a NaN loss reports its metric as NaN: never better than a cutoff, never best.
    return ray.tune.TuneConfig(metric=metric, mode="min", search_alg=searcher, scheduler=scheduler,
                               num_samples=spec.trials, max_concurrent_trials=limit)


def fit_sweep_resources(cfg: Config, spec: SweepSpec) -> tuple[Config, bool, int]:
    """How many trials run at once (max_concurrent, else as many as the cluster's CPUs, at
    cpus_per_worker or 1 per worker, and GPUs hold) and the CPUs each worker gets (cpus_per_worker,
    else the CPUs shared out among the concurrent trials' workers): the machine is used whole and
    never oversubscribed."""
    import ray

    from groupdir.train import fit_resources

    # One trial at its smallest, checked first: it refuses what cannot fit at all.
    _, use_gpu = fit_resources(dataclasses.replace(cfg, cpus_per_worker=cfg.cpus_per_worker or 1.0))
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    holds = cpus // (cfg.workers * (cfg.cpus_per_worker or 1))
    if use_gpu:
        holds = min(holds, gpus // (cfg.workers * cfg.gpus_per_worker))
    concurrent = spec.max_concurrent or int(max(1, min(holds, spec.total_trials)))
    if not cfg.cpus_per_worker:
        share = 1 if cfg.address else max(1, int(cpus // (concurrent * cfg.workers)))
        cfg = dataclasses.replace(cfg, cpus_per_worker=float(share))
    return cfg, use_gpu, concurrent


def claim_sweep_dir(sweep_dir: Path, spec: SweepSpec, cfg: Config, resume: bool) -> dict | None:
    """A new sweep needs a new folder; --resume needs the same space and config as before (the
    config as given: CPUs per worker are worked out anew on the cluster it resumes on)."""
    record_file = sweep_dir / RECORD
    if not resume:
        if record_file.exists():
            raise FileExistsError(f"{sweep_dir} already holds a sweep; pass --resume to continue it, "
                                  f"or pick another --name")
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
    """A sweep that stopped before its end: the parent is KILLED when interrupted (--resume reopens
    it), FAILED otherwise."""
    from groupdir import tracking

    mark_running_trials_interrupted(uri, parent_id)
    tracking.finish_run(uri, parent_id, "KILLED" if interrupted else "FAILED")


def mark_running_trials_interrupted(uri: str, parent_id: str) -> None:
    """Trials whose driver is gone: KILLED, tagged `interrupted` (a resumed trial reopens its run).
    Also run on --resume, for the trials of a driver that was killed outright."""
    from groupdir import tracking

    for run in tracking.child_runs(uri, parent_id):
        if run.info.status == "RUNNING":
            tracking.set_tags(uri, run.info.run_id, {"interrupted": "true"})
            tracking.finish_run(uri, run.info.run_id, "KILLED")


# ====================================== one trial ========================================

def run_trial(params: dict, job: dict) -> None:
    """One trial, in its Tune actor: the sampled params over the sweep's config, trained by a
    TorchTrainer whose reports Tune's callback forwards to the scheduler. A resumed trial reopens
    its MLflow run, and its TorchTrainer (same name, same storage) goes on from its last checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from groupdir import tracking
    from groupdir.train import train_run

    trial_id = ray.tune.get_context().get_trial_id()
    params = {key: value.item() if hasattr(value, "item") else value for key, value in params.items()}  # numpy
    spec = {p.key: p for p in job["params"]}
    settings = {k: v for key, value in params.items() for k, v in spec[key].settings(value).items()}
    cfg = load_config(overrides={**job["cfg"].to_dict(), **settings})
    bundle_names = {key: value for key, value in params.items() if spec[key].bundles}
    run_dir = Path(job["sweep_dir"]) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = trial_run(cfg.tracking_uri, job["parent_run_id"], trial_id)
    if existing:
        tracking.set_tags(cfg.tracking_uri, existing.info.run_id, {"interrupted": "false"})
    run_id = tracking.open_run(cfg.tracking_uri, cfg.experiment, trial_id, {**cfg.to_dict(), **bundle_names},
                               trial_tags(cfg, job, trial_id), existing.info.run_id if existing else "")
    train_run(cfg, job["use_gpu"], run_dir, str(Path(job["sweep_dir"]) / "ray"), f"train-trial_id={trial_id}",
              run_id, progress=False, callbacks=(TuneReportCallback(),), mark_failures=False)


def trial_tags(cfg: Config, job: dict, trial_id: str) -> dict:
    from groupdir import tracking

    return {**tracking.provenance_tags(cfg, job["dataset"]), "mlflow.parentRunId": job["parent_run_id"],
            "sweep": job["sweep"], "trial_id": trial_id, "kind": "trial"}


def trial_run(uri: str, parent_id: str, trial_id: str):
    """The MLflow run of a trial (tag trial_id under the parent), or None before it started."""
    from groupdir import tracking

    found = [run for run in tracking.child_runs(uri, parent_id) if run.data.tags.get("trial_id") == trial_id]
    return found[0] if found else None


class TrialProgress(Callback):
    """Driver side: one line per trial event, and the MLflow status of trials that cannot say it
    themselves: stopped early by ASHA (the trial is torn down), or failed (only Tune can tell a
    failure from a teardown)."""

    def __init__(self, uri: str, experiment: str, parent_id: str, metric: str):
        self.uri, self.experiment, self.parent_id, self.metric = uri, experiment, parent_id, metric

    def on_trial_start(self, iteration, trials, trial, **info):
        settings = "  ".join(f"{key}={_short(value)}" for key, value in trial.config.items())
        print(f"  {trial.trial_id} started: {settings}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        from groupdir import tracking

        result = trial.last_result or {}
        epoch, epochs, value = result.get("epoch", 0), result.get("epochs", "?"), result.get(self.metric, math.nan)
        run = trial_run(self.uri, self.parent_id, trial.trial_id)
        if run is not None and run.info.status == "RUNNING":  # ASHA stopped it; it is being torn down
            # stopped_epoch: epochs its workers log in the moment before they stop are not its result
            tracking.set_tags(self.uri, run.info.run_id, {"stopped_early": f"ASHA after epoch {epoch}",
                                                          "stopped_epoch": epoch})
            tracking.finish_run(self.uri, run.info.run_id, "KILLED")
            print(f"  {trial.trial_id} stopped early by ASHA after epoch {epoch}/{epochs}: "
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
        run = trial_run(self.uri, self.parent_id, trial.trial_id)
        if run is None:  # it died before it could open its run: record it all the same
            run_id = tracking.open_run(self.uri, self.experiment, trial.trial_id, trial.config,
                                       {"mlflow.parentRunId": self.parent_id, "trial_id": trial.trial_id, "kind": "trial"})
        else:
            run_id = run.info.run_id
        tracking.finish_run(self.uri, run_id, "FAILED", error=reason)
        print(f"  {trial.trial_id} FAILED: {reason[:300]}", flush=True)


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
        if "stopped_epoch" in run.data.tags:
            history = [m for m in history if m.step <= int(run.data.tags["stopped_epoch"])]
        status = run.info.status
        if status == "KILLED":
            status = "STOPPED_EARLY" if "stopped_early" in run.data.tags else "INTERRUPTED"
        values = [m.value for m in history if math.isfinite(m.value)]
        # A finished run logs its delivered model's validation score (after classifier re-training,
        # which no epoch's report sees); other runs are judged on their best epoch.
        delivered = run.data.metrics.get(f"best_val/{select_metric}") if status == "FINISHED" else None
        rows.append({"trial": run.data.tags.get("trial_id", ""), "run_id": run.info.run_id, "status": status,
                     "params": {p.key: run.data.params[p.key] if p.bundles else parse_value(p.key, run.data.params[p.key])
                                for p in spec.params},
                     "best_val": delivered if delivered is not None else min(values) if values else math.nan,
                     "epochs": len({m.step for m in history}),
                     "test": {k: v for k, v in run.data.metrics.items() if k.startswith("test/")},
                     "best_logged": f"best_val/{select_metric}" in run.data.metrics})
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
        if math.isfinite(row["best_val"]) and not row["best_logged"]:
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
