"""MLflow, through one owner: `Tracker`. Nothing else in groupdir talks to MLflow.

Who uses it, for what: the driver checks the store before anything starts (a typo must not cost an
hour of training) and opens the run (config as params, provenance tags). During training rank 0's
`RunLogger` sends every `log_every` steps' loss terms, each finished epoch and the system metrics,
from a background thread: a slow or absent tracking server never holds up a step. At the end the
driver's `publish_run` sends what the run folder holds and MLflow does not yet (epochs it missed,
the test results, shot table, plots, checkpoint) and ends the run; a rerun of the same command does
the same for a run whose server was away at its end. A sweep's driver opens the parent run, ends
the trials that cannot end themselves (stopped early, failed) and logs the summary. Epochs are
logged only if MLflow does not hold them yet and steps only past the last one it holds, so neither
a worker restart nor a replay ever logs anything twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import yaml

from groupdir import __version__
from groupdir.config import PRESET_CSV
from groupdir.errors import ConfigError

DEFAULT_URI = "sqlite:///mlflow.db"
NOTE = "mlflow.note.content"  # the MLflow UI shows this tag as a run's or experiment's description
EXPERIMENT_NOTE = ("groupdir runs: one run per `groupdir train`; a sweep is a parent run with its trials nested "
                   "under it. In MLflow 3, switch the UI to \"Model training\" (top left) to see runs and charts.")
EPOCH_MARKER = "epoch/number"  # logged with every epoch; its steps say which epochs MLflow holds
STEP_MARKER = "step/total"  # logged every log_every steps; its last step says where a replay starts
BATCH_LIMIT = 1000  # metrics per MLflow log_batch call
# MLflow retries a failed HTTP request 7 times, up to 2 minutes apart, so a call to an absent server
# hangs for minutes. groupdir waits in its own way (RunLogger, publish_run): each call fails fast.
# MLflow also prints two links whenever a run ends (each sweep trial's too); the train command
# prints the run once. MLflow takes these settings only from the environment.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


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

        # MLflow logs at INFO when it creates a store's tables (which creating the client does) or
        # starts and stops the system monitor: noise in a training log. Set after the import, which
        # configures MLflow's logger.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = uri
        if uri.startswith(("http://", "https://")):
            os.environ.update(HTTP_SETTINGS)
        self.client = MlflowClient(tracking_uri=uri)

    # --- runs -------------------------------------------------------------------------------
    def open_run(self, experiment: str, run_name: str, params: dict, tags: dict, run_id: str = "") -> str:
        """Create the run (or reopen `run_id`, when a crashed run resumes); returns its id."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_data(self, run_id: str, name: str, digest: str, source: str) -> None:
        """The run's training data as an MLflow dataset input (the runs table's Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        data = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}))
        self.client.log_inputs(run_id, [DatasetInput(data, [InputTag("mlflow.data.context", "train")])])

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created if missing."""
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name, tags={NOTE: EXPERIMENT_NOTE})

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

    # --- what MLflow holds of a training run --------------------------------------------------
    def logged_epochs(self, run_id: str) -> set[int]:
        return {m.step for m in self.metric_history(run_id, EPOCH_MARKER)}

    def last_logged_step(self, run_id: str) -> int:
        """The last optimizer step whose per-step metrics MLflow holds (-1: none)."""
        return max((m.step for m in self.metric_history(run_id, STEP_MARKER)), default=-1)

    def artifact_paths(self, run_id: str, folder: str = "") -> set[str]:
        return {a.path for a in self.client.list_artifacts(run_id, folder or None)}


def epoch_metrics(history: list[dict], skip: set[int]) -> list:
    """MLflow metrics of each epoch record not in `skip`, at step = epoch (what `charted` keeps)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(epoch_metric_name(key), float(value), now, record["epoch"]) for record in history
            if record["epoch"] not in skip for key, value in record.items()
            if _finite(value) and charted(key.split("/", 1)[-1])]


def epoch_metric_name(key: str) -> str:
    """history.json's unprefixed keys (epoch, steps, train_seconds, images_per_second) go under
    epoch/ in MLflow: a chart section of their own, not the UI's catch-all one."""
    if "/" in key:
        return key
    return EPOCH_MARKER if key == "epoch" else f"epoch/{key}"


def step_metrics(steps: list[dict], after: int) -> list:
    """MLflow metrics of each per-step record past step `after`."""
    from mlflow.entities import Metric

    return [Metric(key, float(value), int(record["time_ms"]), record["step"]) for record in steps
            if record["step"] > after for key, value in record.items() if key.startswith("step/") and _finite(value)]


ROUTE_SUMMARY = ("mae/all", "mae/few", "bmae/all", "group_acc")  # each route's figures among the metrics


def result_metrics(results: dict) -> dict:
    """test/KEY: the route validation selected (the headline); routes/ROUTE_KEY: a few figures of
    every test route; reference/ROUTE_KEY: the routes that read the true group (never a test
    result); best_val/KEY: the delivered model's validation metrics (after classifier re-training);
    seconds/PHASE: where rank 0's time went. The MLflow UI gives every name prefix (up to the last
    "/") a chart section of its own, so routes keep one section each of routes/ and reference/;
    every route's whole table is the artifact test_shot_table.md. Sample counts (n/SHOT) are there too."""
    from groupdir.evaluation import REFERENCE_ROUTES, TEST_ROUTES

    def summary(prefix: str, routes: tuple) -> dict:
        return {f"{prefix}/{route}_{key.replace('/', '_')}": results[route][key] for route in routes if route in results
                for key in ROUTE_SUMMARY if key in results[route]}

    return {**{f"test/{key}": value for key, value in results[results["selected_route"]].items() if charted(key)},
            **summary("routes", TEST_ROUTES), **summary("reference", REFERENCE_ROUTES),
            **{f"calibration/{key}": value for key, value in results["calibration"].items() if key != "shift"},
            **{f"best_val/{key}": value for key, value in results["validation"].items() if charted(key)},
            **results["classifier_retraining"],
            **{f"seconds/{phase}": seconds for phase, seconds in results.get("timings", {}).items()}}


def charted(key: str) -> bool:
    """Whether a metric of the headline route goes to MLflow: not a sample count (n/SHOT: a flat line)
    nor another route's figure (ROUTE/METRIC/SHOT: a chart section per route); history.json and
    results.json keep them all."""
    return not key.startswith("n/") and "/n/" not in key and key.count("/") <= 1


class RunLogger:
    """Rank 0's MLflow logging during training. Metrics queue up and one background thread sends
    them, a batch at a time; while the server does not answer they wait (one warning), and go with
    the next batch once it does. The system metrics monitor (MLflow's) stops when it cannot reach
    the server; it is started again when the server is back. `close` hands back what could not be
    sent, for the driver to replay.

    Not MLflow's own async logging (log_batch(synchronous=False)): a batch it fails to send is
    dropped, and it offers no way to ask whether a batch is done without waiting for it."""

    def __init__(self, tracker: Tracker, run_id: str, say):
        self.tracker, self.run_id, self.say = tracker, run_id, say
        # While the server is away, urllib3 warns of each refused connection and MLflow's monitor
        # of its stop; our one warning says it.
        for name in ("urllib3.connectionpool", "mlflow.system_metrics"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.epochs: list[dict] = []   # epoch records waiting to be sent
        self.steps: list[dict] = []    # per-step records waiting to be sent
        self.lock = threading.Lock()
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="groupdir-mlflow")
        self.sending: Future | None = None
        self.logged: set[int] | None = None  # the epochs MLflow holds; None until the server answered
        self.last_step = -1
        self.unreachable_since: float | None = None
        self.monitor = None
        self.closed = False

    def log_step(self, step: int, values: dict) -> None:
        with self.lock:
            self.steps.append({"step": step, "time_ms": int(time.time() * 1000),
                               **{f"step/{key}": value for key, value in values.items()}})
        self.send()

    def log_epochs(self, history: list[dict]) -> None:
        """The epochs of `history` MLflow does not hold yet (after a restart: those logged before
        the crash are skipped)."""
        with self.lock:
            known = {record["epoch"] for record in self.epochs} | (self.logged or set())
            self.epochs += [record for record in history if record["epoch"] not in known]
        self.send()

    def send(self) -> None:
        """Hand what waits to the background thread, unless it is still busy with a batch."""
        if self.sending is None or self.sending.done():
            self.sending = self.sender.submit(self._send_waiting)

    def close(self, timeout: float = 60.0) -> list[dict]:
        """Stop (once; later calls do nothing): a last attempt to send what waits; returns the
        per-step records still unsent. Each MLflow call is bounded by HTTP_SETTINGS; `timeout`
        bounds the wait for the whole."""
        if self.closed:
            return []
        self.closed = True
        last = self.sender.submit(self._send_waiting)  # runs after the send in flight, if any
        try:
            last.result(timeout=timeout)
        except FutureTimeout:
            self.say(f"warning: MLflow at {self.tracker.uri} is slow; stopped waiting after {timeout:g} s")
        self.sender.shutdown(wait=False)
        if self.monitor is not None:
            self.monitor.finish()
        with self.lock:
            return list(self.steps)

    # --- the background thread -----------------------------------------------------------------
    def _send_waiting(self) -> None:
        """Send what waits; when the server does not answer, leave it waiting for the next try."""
        try:
            if self.logged is None:  # what MLflow holds from before a worker restart
                logged, last_step = self.tracker.logged_epochs(self.run_id), self.tracker.last_logged_step(self.run_id)
                with self.lock:
                    self.logged, self.last_step = logged, last_step
            with self.lock:
                epochs, steps = self.epochs[:], self.steps[:]
            records = epoch_metrics(epochs, skip=self.logged) + step_metrics(steps, after=self.last_step)
            if len(records) <= BATCH_LIMIT:
                self.tracker.log_metric_records(self.run_id, records)
                self._sent(epochs, steps)
            else:  # a backlog: a record at a time, so that a failure part-way sends nothing twice
                for record in epochs:
                    self.tracker.log_metric_records(self.run_id, epoch_metrics([record], skip=self.logged))
                    self._sent([record], [])
                for start in range(0, len(steps), 100):
                    part = steps[start:start + 100]
                    self.tracker.log_metric_records(self.run_id, step_metrics(part, after=self.last_step))
                    self._sent([], part)
        except Exception as err:  # refused, a timeout, a 5xx, a locked sqlite file: all wait for the next try
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
                reason = "does not answer" if server_unreachable(err) else f"failed: {type(err).__name__}: {str(err)[:300]}"
                self.say(f"warning: MLflow at {self.tracker.uri} {reason}; training goes on, its metrics wait "
                         f"and are sent when it is back")
            return
        if self.unreachable_since is not None:
            self.say(f"MLflow answers again after {time.monotonic() - self.unreachable_since:.0f} s; "
                     f"the metrics that waited are sent")
            self.unreachable_since = None
        self._keep_monitoring()

    def _sent(self, epochs: list[dict], steps: list[dict]) -> None:
        """`epochs` and `steps`, the front of their queues, are in MLflow."""
        with self.lock:
            del self.epochs[:len(epochs)], self.steps[:len(steps)]
            self.logged |= {record["epoch"] for record in epochs}
            self.last_step = max([self.last_step] + [record["step"] for record in steps])

    def _keep_monitoring(self) -> None:
        """CPU, memory and GPU use every 5 s, continuing the run's step numbers after a restart or
        an outage (MLflow's monitor ends at its first failed call)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if self.monitor is None or self.monitor._process is None or not self.monitor._process.is_alive():
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, resume_logging=True,
                                                tracking_uri=self.tracker.uri)
            self.monitor.start()


def publish_run(tracker: Tracker, run_id: str, run_dir: Path, cfg_dict: dict, extra_artifacts: tuple = ()) -> None:
    """Send what the finished run folder holds and MLflow does not (epochs, per-step metrics rank 0
    could not send, test results, shot table, config, plots, checkpoint), then mark the run
    FINISHED. Safe to repeat: what MLflow holds is not sent again."""
    from groupdir import checkpoint
    from groupdir.atomic import read_json
    from groupdir.metrics import format_shot_table

    history, results = read_json(run_dir / checkpoint.HISTORY), read_json(run_dir / checkpoint.RESULTS)
    unsent = run_dir / checkpoint.UNSENT_STEPS
    tracker.log_metric_records(run_id, epoch_metrics(history, skip=tracker.logged_epochs(run_id)))
    if unsent.exists():
        tracker.log_metric_records(run_id, step_metrics(json.loads(unsent.read_text()),
                                                        after=tracker.last_logged_step(run_id)))
    run = tracker.run(run_id)
    if "test/mae/all" not in run.data.metrics:  # the tags first: a retry after a failure sets them again
        selected = results[results["selected_route"]]
        tracker.set_tags(run_id, {"selected_route": results["selected_route"], NOTE:
                                  f"**Test MAE {selected['mae/all']:.2f}** (few-shot {selected['mae/few']:.2f}), "
                                  f"bMAE {selected['bmae/all']:.2f}; route `{results['selected_route']}`, chosen on "
                                  f"validation; best epoch {results['best_epoch']}.\n\n"
                                  + run_note(cfg_dict, run.data.tags.get("dataset", ""))})
        # At the last epoch's step, so that the test figures sit at the end of the epoch curves.
        tracker.log_metrics(run_id, result_metrics(results), step=history[-1]["epoch"] if history else 0)
    held = tracker.artifact_paths(run_id)
    if "test_shot_table.md" not in held:
        tracker.log_text(run_id, "# Test shot table\n\n```\n" + format_shot_table({cfg_dict["method"]: results})
                         + "\n```\n", "test_shot_table.md")
    if "config.yaml" not in held:
        tracker.log_text(run_id, yaml.safe_dump(cfg_dict, sort_keys=False), "config.yaml")
    plots = run_dir / checkpoint.PLOTS
    if plots.is_dir() and checkpoint.PLOTS not in held:
        tracker.client.log_artifacts(run_id, str(plots), checkpoint.PLOTS)
    for path in (run_dir / checkpoint.CHECKPOINT, *extra_artifacts):
        if path.name not in held:
            tracker.log_artifact(run_id, path)
    tracker.finish_run(run_id, "FINISHED")


def server_unreachable(err: BaseException) -> bool:
    """Whether `err` is MLflow failing to reach its server (refused, timed out, a 5xx), as opposed
    to a request the server answered with an error."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and str(err).startswith("API request to")


def run_params(config: dict, dataset: str) -> dict:
    """A config as MLflow params: `dataset=auto` as the preset it found (`dataset`: the data set's
    CSV name; a config value that reproduces the run), and no unset options (None, ""; label_min,
    csv, ...), which would be blank cells in the runs table."""
    params = {key: value for key, value in config.items() if value not in (None, "")}
    if params.get("dataset") == "auto":
        params["dataset"] = {Path(csv).stem: name for name, csv in PRESET_CSV.items()}.get(dataset, "auto")
    return params


def provenance_tags(cfg, dataset: str, command: str = "groupdir train") -> dict:
    """The tags every run gets: what it trains on and with, and where the code came from (MLflow's
    own mlflow.source.* tags fill the UI's Source column; mlflow.note.content is its description)."""
    commit = git_commit()
    return {"dataset": dataset, "method": cfg.method, "groupdir_version": __version__, "git_commit": commit,
            "workers": str(cfg.workers), "mlflow.source.name": command, "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": commit, NOTE: run_note(cfg.to_dict(), dataset)}


def run_note(cfg_dict: dict, dataset: str = "") -> str:
    """A run's description in the MLflow UI (its results are added at the end)."""
    data = dataset or Path(cfg_dict["data"]).name
    return (f"**{cfg_dict['method']}** on `{data}` ({cfg_dict['data']}): {cfg_dict['epochs']} epochs, "
            f"{cfg_dict['workers']} worker(s), backbone {cfg_dict['backbone']} at {cfg_dict['image_size']} px, "
            f"batch {cfg_dict['batch_size']}" + (f", {cfg_dict['num_groups']} groups" if cfg_dict["method"] == "groupdir" else "")
            + ". Metrics: `train/*` and `val/*` per epoch (x axis: epoch), `step/*` every log_every optimizer steps "
              "(x axis: step), `test/*` the route validation selected, `routes/*` every route, `reference/*` the "
              "routes that read the true group (not results); every route in test_shot_table.md.")


UI_VIEW = "?workflowType=machine_learning"  # MLflow 3's UI opens its GenAI view unless told otherwise


def ui_hint(uri: str, experiment: str) -> str:
    """How to look at `experiment` in the MLflow UI (in its "Model training" view)."""
    if uri.startswith(("http://", "https://")):
        found = Tracker(uri).client.get_experiment_by_name(experiment)
        page = f"#/experiments/{found.experiment_id}/runs" if found else ""
        return f"  open {uri.rstrip('/')}/{page}{UI_VIEW}"
    return (f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
            f"  then open http://127.0.0.1:5000/{UI_VIEW}")


def run_page(server: str, experiment_id: str, run_id: str) -> str:
    """A run's page on an MLflow server, in the UI's "Model training" view."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{UI_VIEW}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
