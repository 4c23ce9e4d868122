"""MLflow, through one owner: `Tracker`. Nothing else in groupdir talks to MLflow.

Who uses it, for what: the driver checks the store before anything starts (a typo must not cost an
hour of training), opens the run (config as params, provenance tags), logs the best checkpoint and
ends the run. Rank 0 logs each finished epoch, the system metrics and the test results, shot table
and plots. A sweep's driver opens the parent run, ends the trials that cannot end themselves
(stopped early, failed) and logs the summary. Epochs are logged from the checkpointed history and
only if not logged yet, so a worker restart never logs an epoch twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from groupdir import __version__
from groupdir.errors import ConfigError

DEFAULT_URI = "sqlite:///mlflow.db"
EPOCH_MARKER = "epoch"  # logged with every epoch; its steps say which epochs MLflow holds


def resolve_uri(uri: str) -> str:
    """"" -> sqlite:///mlflow.db in the working directory; relative sqlite paths become absolute,
    so Ray workers (whose working directory differs) write to the same file."""
    uri = uri or DEFAULT_URI
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"tracking_uri={uri!r}: MLflow 3 no longer accepts file stores; use "
                          f"{DEFAULT_URI} or an http(s):// tracking server")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before Ray starts, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            raise ConfigError(f"MLflow tracking server {uri} is unreachable ({err}); start it "
                              f"(mlflow server --backend-store-uri {DEFAULT_URI}) or fix tracking_uri") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ConfigError(f"tracking_uri={uri}: folder {folder} does not exist")
    try:
        Tracker(uri).client.search_experiments(max_results=1)
    except Exception as err:  # MLflow raises many types: connection, SQL, permission
        raise ConfigError(f"MLflow tracking store {uri} cannot be used: {type(err).__name__}: {err}") from None


class Tracker:
    """One MLflow store (`uri`): runs opened, logged to, read and ended."""

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        # MLflow logs at INFO when it creates tables or starts and stops the system monitor: noise in
        # a training log. Set after the import, which configures MLflow's logger.
        logging.getLogger("mlflow").setLevel(logging.WARNING)

    # --- runs -------------------------------------------------------------------------------
    def open_run(self, experiment: str, run_name: str, params: dict, tags: dict, run_id: str = "") -> str:
        """Create the run (or reopen `run_id`, when a crashed run resumes); returns its id."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created if missing."""
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def finish_run(self, run_id: str, status: str, error: str = "") -> None:
        """status: FINISHED, FAILED, or KILLED (Ctrl-C, stopped early); a failure's message goes in the
        tag `error`. A run already ended keeps its status: a sweep marks a trial KILLED when ASHA
        stops it, and the trial's own driver, torn down a moment later, must not undo that."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            return
        if error:
            self.client.set_tag(run_id, "error", error[:5000])  # MLflow caps tag values
        self.client.set_terminated(run_id, status=status)

    def run(self, run_id: str):
        return self.client.get_run(run_id)

    def child_runs(self, parent_run_id: str, trial_id: str = "") -> list:
        """The runs nested under `parent_run_id` (tag mlflow.parentRunId), oldest first; only the
        one of a sweep's trial when `trial_id` is given."""
        experiment_id = self.client.get_run(parent_run_id).info.experiment_id
        query = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (f" and tags.trial_id = '{trial_id}'" if trial_id else "")
        return list(self.client.search_runs([experiment_id], query, max_results=50000,
                                            order_by=["attributes.start_time ASC"]))

    def metric_history(self, run_id: str, key: str) -> list:
        return self.client.get_metric_history(run_id, key)

    # --- logging ----------------------------------------------------------------------------
    def set_tags(self, run_id: str, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, values: dict, step: int = 0) -> None:
        """The finite numbers of `values` at `step` (NaN and None are left out)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.log_metric_records(run_id, [Metric(key, float(value), now, step)
                                         for key, value in values.items() if _finite(value)])

    def log_metric_records(self, run_id: str, metrics: list) -> None:
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_figure(self, run_id: str, figure, name: str) -> None:
        self.client.log_figure(run_id, figure, name)

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    # --- a training run's epochs and results --------------------------------------------------
    def log_epochs(self, run_id: str, history: list[dict]) -> None:
        """Log each epoch of `history` that MLflow does not hold yet, at step = epoch."""
        from mlflow.entities import Metric

        logged = {m.step for m in self.metric_history(run_id, EPOCH_MARKER)}
        now = int(time.time() * 1000)
        self.log_metric_records(run_id, [Metric(key, float(value), now, record["epoch"])
                                         for record in history if record["epoch"] not in logged
                                         for key, value in record.items() if _finite(value)])

    def final_logged(self, run_id: str) -> bool:
        """Whether the test results are in (a driver resumed after the final report must not
        log them twice)."""
        return "test/mae/all" in self.client.get_run(run_id).data.metrics

    def log_results(self, run_id: str, results: dict, cfg_dict: dict, shot_table: str, figures: dict) -> None:
        """test/KEY: the route validation selected (the headline); test/ROUTE/KEY: every route;
        best_val/KEY: the delivered model's validation metrics (after classifier re-training);
        seconds/PHASE: where rank 0's time went."""
        from groupdir.evaluation import REFERENCE_ROUTES, TEST_ROUTES

        routes = {route: results[route] for route in TEST_ROUTES + REFERENCE_ROUTES if route in results}
        self.log_metrics(run_id, {
            **{f"test/{key}": value for key, value in routes[results["selected_route"]].items()},
            **{f"test/{route}/{key}": value for route, metrics in routes.items() for key, value in metrics.items()},
            **{f"calibration/{key}": value for key, value in results["calibration"].items() if key != "shift"},
            **{f"best_val/{key}": value for key, value in results["validation"].items()},
            **results["classifier_retraining"],
            **{f"seconds/{phase}": seconds for phase, seconds in results.get("timings", {}).items()}})
        self.client.set_tag(run_id, "selected_route", results["selected_route"])
        self.log_text(run_id, "# Test shot table\n\n```\n" + shot_table + "\n```\n", "test_shot_table.md")
        self.log_text(run_id, yaml.safe_dump(cfg_dict, sort_keys=False), "config.yaml")
        for name, figure in figures.items():
            self.log_figure(run_id, figure, f"plots/{name}.png")

    @contextlib.contextmanager
    def system_metrics(self, run_id: str):
        """CPU, memory and GPU use logged to the run while the block runs, through MLflow's public
        switch (a run started with log_system_metrics=True; a restarted worker continues the run's
        step numbers). Leaving the block ends MLflow's active run in this process without changing
        the run's status: whoever ends the run (the driver) sets that."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)  # the fluent API's process-wide store: this worker's only
        mlflow.set_system_metrics_sampling_interval(5)
        mlflow.start_run(run_id=run_id, log_system_metrics=True)
        try:
            yield
        finally:
            mlflow.end_run(status=self.client.get_run(run_id).info.status)


def provenance_tags(cfg, dataset: str) -> dict:
    return {"dataset": dataset, "method": cfg.method, "groupdir_version": __version__,
            "git_commit": git_commit(), "workers": str(cfg.workers)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
