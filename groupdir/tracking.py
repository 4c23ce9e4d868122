"""MLflow: one run per training run, created by the driver, filled by rank 0 alone.

The driver checks the tracking server before anything starts (a typo must not cost an hour of
training), creates the run with the config as params and the provenance tags, and marks it
FINISHED or FAILED at the end. Rank 0 logs each finished epoch, the system metrics, and at the end
the test shot table, plots, config, meta.json and the best checkpoint. Epochs are logged from the
checkpointed history and only if not logged yet, so a worker restart never logs an epoch twice.
"""

from __future__ import annotations

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
        mlflow_client(uri).search_experiments(max_results=1)
    except Exception as err:  # MLflow raises many types: connection, SQL, permission
        raise ConfigError(f"MLflow tracking store {uri} cannot be used: {type(err).__name__}: {err}") from None


def open_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict, run_id: str = "") -> str:
    """Create the run (or reopen `run_id`, when a crashed run resumes); returns its id."""
    client = mlflow_client(uri)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags)
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return run.info.run_id


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing."""
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def finish_run(uri: str, run_id: str, status: str, error: str = "") -> None:
    """status: FINISHED, FAILED, or KILLED (Ctrl-C); a failure's message goes in the tag `error`.
    The first verdict stands: a run already ended elsewhere keeps its status (a sweep marks a trial
    KILLED when ASHA stops it; the trial's workers, torn down a moment later, must not undo that)."""
    client = mlflow_client(uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return
    if error:
        client.set_tag(run_id, "error", error[:5000])  # MLflow caps tag values
    client.set_terminated(run_id, status=status)


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    client = mlflow_client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def child_runs(uri: str, parent_run_id: str) -> list:
    """The runs nested under `parent_run_id` (tag mlflow.parentRunId), oldest first."""
    client = mlflow_client(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return list(client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                   max_results=50000, order_by=["attributes.start_time ASC"]))


def provenance_tags(cfg, dataset: str) -> dict:
    return {"dataset": dataset, "method": cfg.method, "groupdir_version": __version__,
            "git_commit": git_commit(), "workers": str(cfg.workers)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLogger:
    """Rank 0's handle on the run: epochs, system metrics, final artifacts."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.uri, self.run_id = uri, run_id
        self.client = mlflow_client(uri)  # before the monitor: it quiets MLflow's INFO lines
        self.system = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=True, tracking_uri=uri)
        self.system.start()

    def log_epochs(self, history: list[dict]) -> None:
        """Log each epoch of `history` that MLflow does not hold yet, at step = epoch."""
        from mlflow.entities import Metric

        logged = {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_MARKER)}
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, record["epoch"])
                   for record in history if record["epoch"] not in logged
                   for key, value in record.items() if _finite(value)]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def final_logged(self) -> bool:
        """Whether the test results are in (a driver resumed after the final report must not
        log them twice)."""
        return "test/mae/all" in self.client.get_run(self.run_id).data.metrics

    def log_final(self, results: dict, cfg_dict: dict, shot_table: str, figures: dict, files: list[Path]) -> None:
        from mlflow.entities import Metric

        from groupdir.evaluation import REFERENCE_ROUTES, TEST_ROUTES

        now = int(time.time() * 1000)
        # test/KEY: the route validation selected (the headline); test/ROUTE/KEY: every route;
        # best_val/KEY: the delivered model's validation metrics (after classifier re-training).
        routes = {route: results[route] for route in TEST_ROUTES + REFERENCE_ROUTES if route in results}
        values = {**{f"test/{key}": value for key, value in routes[results["selected_route"]].items()},
                  **{f"test/{route}/{key}": value for route, metrics in routes.items() for key, value in metrics.items()},
                  **{f"calibration/{key}": value for key, value in results["calibration"].items() if key != "shift"},
                  **{f"best_val/{key}": value for key, value in results["validation"].items()},
                  **results["classifier_retraining"]}
        metrics = [Metric(key, float(value), now, 0) for key, value in values.items() if _finite(value)]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        self.client.set_tag(self.run_id, "selected_route", results["selected_route"])
        self.client.log_text(self.run_id, "# Test shot table\n\n```\n" + shot_table + "\n```\n", "test_shot_table.md")
        self.client.log_text(self.run_id, yaml.safe_dump(cfg_dict, sort_keys=False), "config.yaml")
        for name, figure in figures.items():
            self.client.log_figure(self.run_id, figure, f"plots/{name}.png")
        for path in files:
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.system.finish()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    # MLflow logs at INFO when it creates tables or starts and stops the system monitor: noise in
    # a training log. Set after the import, which configures MLflow's logger.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)
