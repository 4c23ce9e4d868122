"""Running a sweep: the parent MLflow run, the Tuner (Optuna or a grid, ASHA), one TorchTrainer per
trial through the driver's `train_run`, the trials' MLflow status, and resuming."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from groupdir import recipe
from groupdir.atomic import write_json_atomic
from groupdir.config import Config, changed_settings, load_config
from groupdir.driver import fit_resources, preflight, ray_session, resolve_paths, train_run, training_data
from groupdir.errors import ConfigError, GroupingError
from groupdir.sweep.space import SweepSpec, candidates, refused, short
from groupdir.sweep.summary import summarize, trial_rows
from groupdir.tracking import NOTE, Tracker, check_reachable, provenance_tags, run_params

RECORD = "sweep.json"
TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes: a Python process with torch imported


# ======================================== driver =========================================

def run_sweep(spec: SweepSpec, cfg: Config, sweep_dir: str | Path, resume: bool = False,
              worker_loop=recipe.train_worker) -> dict:
    """Run (or resume) the sweep; returns the summary, also written to the sweep folder.
    `worker_loop`: what each trial's workers run (tests wrap the recipe to inject failures)."""

    sweep_dir = Path(sweep_dir).resolve()
    cfg = resolve_paths(cfg)
    dataset = preflight(cfg)
    for param, value, candidate in candidates(spec, cfg):  # e.g. more groups than the labels allow
        try:
            preflight(candidate)
        except (ConfigError, GroupingError) as err:
            raise refused(spec, param, value, err) from None
    check_reachable(cfg.tracking_uri)
    previous = claim_sweep_dir(sweep_dir, spec, cfg, resume)
    given = cfg.to_dict()
    with ray_session(cfg.address):
        cfg, use_gpu, concurrent = fit_sweep_resources(cfg, spec)
        searched = {key for p in spec.params for value in p.values for key in p.settings(value)}
        parent_id = Tracker(cfg.tracking_uri).open_run(cfg.experiment, spec.name,
            {**run_params({k: v for k, v in cfg.to_dict().items() if k not in searched}, dataset),
             **{f"space/{p.key}": p.describe() for p in spec.params},
             "sweep/space_file": spec.space_file, "sweep/trials": spec.total_trials, "sweep/seed": spec.seed,
             "sweep/asha": f"grace {spec.grace_period}, factor {spec.reduction_factor:g}" if spec.grace_period else "off",
             "sweep/max_concurrent": concurrent},
            {**provenance_tags(cfg, dataset, "groupdir tune"), "kind": "sweep",
             NOTE: f"Sweep `{spec.name}` ({spec.space_file}): {spec.total_trials} trials over "
                   f"{', '.join(p.key for p in spec.params)}, ranked by validation {cfg.select_metric}. Its trials "
                   f"are nested under it; the best trial's settings and results (under the trials' names; tag "
                   f"`best_trial`) and the table of all trials (trials.md) come at the end."},
            previous["mlflow_run_id"] if previous else "")
        if not previous:
            Tracker(cfg.tracking_uri).log_data(parent_id, **training_data(cfg, dataset))
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
               "sweep": spec.name, "dataset": dataset, "params": spec.params, "worker_loop": worker_loop}
        try:
            results = make_tuner(spec, cfg, job, concurrent, resume=previous is not None).fit()
            # Ctrl-C: Tune saves its state and returns early, counting a trial it stopped as ended; a
            # trial whose run is still open (neither finished nor ended by TrialProgress) was cut off.
            ended = results.num_terminated + results.num_errors
            cut_off = [run for run in Tracker(cfg.tracking_uri).child_runs(parent_id) if run.info.status == "RUNNING"]
            if ended < spec.total_trials or cut_off:
                raise KeyboardInterrupt(f"{ended} of {spec.total_trials} trials ended, {len(cut_off)} cut off")
            rows = trial_rows(cfg.tracking_uri, parent_id, cfg.select_metric, spec)
            summary = summarize(cfg.tracking_uri, parent_id, cfg.select_metric, spec, rows, sweep_dir)
            # Every trial has ended and keeps its model in trials/; Ray's checkpoints are the sweep's bulk.
            shutil.rmtree(sweep_dir / "ray", ignore_errors=True)
            return summary
        except BaseException as err:
            mark_unfinished(cfg.tracking_uri, parent_id, interrupted=isinstance(err, KeyboardInterrupt))
            raise


def make_tuner(spec: SweepSpec, cfg: Config, job: dict, concurrent: int, resume: bool):
    """A new Tuner, or on resume the saved one (its searcher and the trials' states)."""
    import ray.tune

    # The trial function only waits on its TorchTrainer: it reserves memory, not the CPUs that the
    # trial's workers need (Tune refuses an empty request).
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, job=job),
                                        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    tune_path = Path(job["sweep_dir"]) / "tune"
    # Ray's newer console output prints its own boxes and paths even at verbose=0; the sweep prints
    # its own lines (TrialProgress). Tune reads this setting only from the environment.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if resume:
        if ray.tune.Tuner.can_restore(str(tune_path)):
            print("resuming: trials that ended are kept, the others go on from their last epoch", flush=True)
            return ray.tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True,
                                          resume_errored=False, restart_errored=False)
        if Tracker(cfg.tracking_uri).child_runs(job["parent_run_id"]):
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
    cpus_per_worker or 1 per worker, and GPUs hold), and the config with the CPUs each worker gets:
    the machine is used whole and never oversubscribed."""
    import ray

    # One trial at its smallest, checked first: it refuses what cannot fit at all.
    _, use_gpu = fit_resources(cfg.replace(cpus_per_worker=cfg.cpus_per_worker or 1.0))
    resources = ray.cluster_resources()
    holds = resources.get("CPU", 0) // (cfg.workers * (cfg.cpus_per_worker or 1))
    if use_gpu:
        holds = min(holds, resources.get("GPU", 0) // (cfg.workers * cfg.gpus_per_worker))
    concurrent = spec.max_concurrent or int(max(1, min(holds, spec.total_trials)))
    cfg, _ = fit_resources(cfg, runs_at_once=concurrent)
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
    changed = [f"{key}: {record['spec'].get(key)!r} -> {value!r}" for key, value in spec.to_dict().items()
               if record["spec"].get(key) != value and key != "space_file"]
    changed += changed_settings(record["config"], cfg.to_dict())
    if changed:
        raise ConfigError(f"--resume: {sweep_dir} was started with other settings ({', '.join(sorted(changed))}); "
                          f"resume it with the same space, options and key=value arguments")
    return record


def mark_unfinished(uri: str, parent_id: str, interrupted: bool) -> None:
    """A sweep that stopped before its end: the parent is KILLED when interrupted (--resume reopens
    it), FAILED otherwise."""

    mark_running_trials_interrupted(uri, parent_id)
    Tracker(uri).finish_run(parent_id, "KILLED" if interrupted else "FAILED")


def mark_running_trials_interrupted(uri: str, parent_id: str) -> None:
    """Trials whose driver is gone: KILLED, tagged `interrupted` (a resumed trial reopens its run).
    Also run on --resume, for the trials of a driver that was killed outright."""

    tracker = Tracker(uri)
    for run in tracker.child_runs(parent_id):
        if run.info.status == "RUNNING":
            tracker.set_tags(run.info.run_id, {"interrupted": "true"})
            tracker.finish_run(run.info.run_id, "KILLED")


# ====================================== one trial ========================================

def run_trial(params: dict, job: dict) -> None:
    """One trial, in its Tune actor: the sampled params over the sweep's config, trained by a
    TorchTrainer whose reports Tune's callback forwards to the scheduler. A resumed trial reopens
    its MLflow run, and its TorchTrainer (same name, same storage) goes on from its last checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    params = {key: value.item() if hasattr(value, "item") else value for key, value in params.items()}  # numpy
    spec = {p.key: p for p in job["params"]}
    settings = {k: v for key, value in params.items() for k, v in spec[key].settings(value).items()}
    cfg = load_config(overrides={**job["cfg"].to_dict(), **settings})
    bundle_names = {key: value for key, value in params.items() if spec[key].bundles}
    run_dir = Path(job["sweep_dir"]) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking_uri)
    existing = trial_run(cfg.tracking_uri, job["parent_run_id"], trial_id)
    if existing:
        tracker.set_tags(existing.info.run_id, {"interrupted": "false"})
    run_id = tracker.open_run(cfg.experiment, trial_name(trial_id, params),
                              run_params({**cfg.to_dict(), **bundle_names}, job["dataset"]),
                              trial_tags(cfg, job, trial_id), existing.info.run_id if existing else "")
    if not existing:
        tracker.log_data(run_id, **training_data(cfg, job["dataset"]))
    train_run(cfg, job["use_gpu"], run_dir, str(Path(job["sweep_dir"]) / "ray"), f"train-trial_id={trial_id}",
              run_id, progress="off", callbacks=(TuneReportCallback(),), mark_failures=False,
              worker_loop=job["worker_loop"])


def trial_name(trial_id: str, params: dict) -> str:
    """A trial's MLflow run name: Tune's id (as in the console and trials/) and what it tries."""
    return " ".join([trial_id, *(f"{key}={short(value)}" for key, value in params.items())])


def trial_tags(cfg: Config, job: dict, trial_id: str) -> dict:
    return {**provenance_tags(cfg, job["dataset"], "groupdir tune"), "mlflow.parentRunId": job["parent_run_id"],
            "sweep": job["sweep"], "trial_id": trial_id, "kind": "trial"}


def trial_run(uri: str, parent_id: str, trial_id: str):
    """The MLflow run of a trial (tag trial_id under the parent), or None before it started."""
    found = Tracker(uri).child_runs(parent_id, trial_id)
    return found[0] if found else None


class TrialProgress(Callback):
    """Driver side: one line per trial event, and the MLflow status of trials that cannot say it
    themselves: stopped early by ASHA (the trial is torn down), or failed (only Tune can tell a
    failure from a teardown)."""

    def __init__(self, uri: str, experiment: str, parent_id: str, metric: str):
        self.uri, self.experiment, self.parent_id, self.metric = uri, experiment, parent_id, metric

    def on_trial_start(self, iteration, trials, trial, **info):
        settings = "  ".join(f"{key}={short(value)}" for key, value in trial.config.items())
        print(f"  {trial.trial_id} started: {settings}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        epoch, epochs, value = result.get("epoch", 0), result.get("epochs", "?"), result.get(self.metric, math.nan)
        run = trial_run(self.uri, self.parent_id, trial.trial_id)
        if run is not None and run.info.status == "RUNNING":  # ASHA stopped it; it is being torn down
            # stopped_epoch: epochs its workers log in the moment before they stop are not its result
            tracker = Tracker(self.uri)
            tracker.set_tags(run.info.run_id, {"stopped_early": f"ASHA after epoch {epoch}",
                                                          "stopped_epoch": epoch})
            tracker.finish_run(run.info.run_id, "KILLED")
            print(f"  {trial.trial_id} stopped early by ASHA after epoch {epoch}/{epochs}: "
                  f"{self.metric} {value:.3f}", flush=True)
        else:
            print(f"  {trial.trial_id} finished: {self.metric} {value:.3f} at epoch {epoch}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        # Tune has just written the trial's traceback; the reason is its last "SomeError: ..." line.
        error_file = Path(trial.error_file) if trial.error_file else None
        trace = error_file.read_text() if error_file and error_file.exists() else ""
        raised = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception): .*)$", trace, flags=re.MULTILINE)
        reason = raised[-1] if raised else f"the trial's process died (see {error_file or 'its log'})"
        run = trial_run(self.uri, self.parent_id, trial.trial_id)
        if run is None:  # it died before it could open its run: record it all the same
            run_id = Tracker(self.uri).open_run(self.experiment, trial_name(trial.trial_id, trial.config), trial.config,
                                       {"mlflow.parentRunId": self.parent_id, "trial_id": trial.trial_id, "kind": "trial"})
        else:
            run_id = run.info.run_id
        Tracker(self.uri).finish_run(run_id, "FAILED", error=reason)
        print(f"  {trial.trial_id} FAILED: {reason[:300]}", flush=True)


