from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from groupdir.atomic import write_json_atomic
from groupdir.config import Config
from groupdir.errors import ConfigError
from groupdir.metrics import shot_metrics
from groupdir.tracking import RunLogger, Tracker, check_reachable, publish_run, resolve_uri, run_page, run_params, step_metrics
from helpers import free_port


def test_uris_resolve_to_absolute_sqlite_and_file_stores_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    for bad in ("./mlruns", "file:///tmp/mlruns"):
        with pytest.raises(ConfigError, match="no longer accepts file stores"):
            resolve_uri(bad)


def test_an_unusable_tracking_store_is_refused_fast(tmp_path):
    with pytest.raises(ConfigError, match="unreachable"):
        check_reachable("http://127.0.0.1:9", timeout=2)  # nothing listens on port 9
    with pytest.raises(ConfigError, match="does not exist"):
        check_reachable(f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a new sqlite store is fine
    assert (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating one takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def results_of_a_run() -> dict:
    """A results.json as a finished run writes it (shot metrics from real predictions)."""
    train = np.array([1.0] * 150 + [2.0] * 40 + [3.0] * 5)
    shots = shot_metrics([1, 2, 3], [1, 2, 3.5], train)
    return {"predicted": {**shots, "group_acc": 0.5, "group_dist": 1.0},
            "adjusted": {**shots, "mae/all": 1.2, "group_acc": 0.7, "group_dist": 0.5},
            "oracle": {**shots, "mae/all": 0.4, "group_acc": 1.0, "group_dist": 0.0}, "selected_route": "adjusted",
            "calibration": {"shift": [0.1, -0.1], "tau": 0.7, "soft_tau": 1.0, "route_temperature": 0.5,
                            "selected_route": "adjusted"},
            "validation": {"bmae/all": 2.5}, "classifier_retraining": {"crt/steps": 30}, "best_epoch": 2, "steps": 20}


def finished_run_folder(folder: Path, history: list[dict], unsent: list[dict]) -> Path:
    (folder / "plots").mkdir(parents=True)
    write_json_atomic(folder / "history.json", history)
    write_json_atomic(folder / "results.json", results_of_a_run())
    write_json_atomic(folder / "unsent_steps.json", unsent)
    (folder / "checkpoint.pt").write_bytes(b"weights")
    (folder / "plots" / "per_label_mae.png").write_bytes(b"png")
    return folder


def test_the_run_logger_logs_each_epoch_and_step_once_across_restarts(store):
    uri = store
    tracker, said = Tracker(uri), []
    run_id = tracker.open_run("e", "r", {"lr": 0.1}, {"method": "groupdir"})
    assert tracker.open_run("e", "r", {}, {}, run_id=run_id) == run_id  # a resumed run reopens its run
    history = [{"epoch": 1, "train/total": 3.0}, {"epoch": 2, "train/total": 2.0}]
    first = RunLogger(tracker, run_id, said.append)
    for step in (5, 10):
        first.log_step(step, {"total": 3.0 - step / 10, "lr": 0.1})
    first.log_epochs(history[:1])
    first.log_epochs(history)
    assert first.close() == []  # everything sent
    # A restarted worker (from epoch 1's checkpoint) sends its history and steps again.
    second = RunLogger(tracker, run_id, said.append)
    second.log_epochs(history[:1])
    for step in (5, 10, 15):
        second.log_step(step, {"total": 9.0, "lr": 0.1})
    second.log_epochs(history + [{"epoch": 3, "train/total": float("nan"), "val/mae/all": 1.0}])
    assert second.close() == [] and second.close() == []  # closing twice is harmless
    assert said == []  # no warning: the store always answered
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/total")] == [(1, 3.0), (2, 2.0)]
    # epoch 3's NaN is left out (MLflow cannot plot it); its other metrics are there
    assert [m.step for m in client.get_metric_history(run_id, "val/mae/all")] == [3]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "step/total")] == [(5, 2.5), (10, 2.0),
                                                                                           (15, 9.0)]
    assert tracker.run(run_id).info.status == "RUNNING"  # the driver ends the run, not rank 0


def test_metrics_wait_while_the_server_is_away_and_a_replay_sends_each_once(store, tmp_path):
    """A run logger whose server does not answer warns once and hands its steps back; the driver's
    publish_run sends the run folder's epochs, steps, results and artifacts, and again sends nothing."""
    uri = store
    tracker, said = Tracker(uri), []
    run_id = tracker.open_run("e", "r", {"lr": 0.1}, {"method": "groupdir"})
    away = RunLogger(Tracker(f"http://127.0.0.1:{free_port()}"), run_id, said.append)  # nothing listens there
    away.log_epochs([{"epoch": 1, "train/total": 3.0}])
    away.log_step(5, {"total": 2.5})
    away.log_step(10, {"total": 2.0})
    unsent = away.close()
    assert [record["step"] for record in unsent] == [5, 10]
    assert len(said) == 1 and said[0].startswith("warning: MLflow at http://127.0.0.1:") and "training goes on" in said[0]

    tracker.log_metric_records(run_id, step_metrics(unsent[:1], after=-1))  # step 5 got through before
    history = [{"epoch": 1, "train/total": 3.0}, {"epoch": 2, "train/total": 2.0}]
    run_dir = finished_run_folder(tmp_path / "run", history, unsent)
    for _ in range(2):  # the end of the run, then a rerun of the command: nothing twice
        publish_run(tracker, run_id, run_dir, {**Config().to_dict(), "data": str(tmp_path / "synth")})
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "train/total")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "step/total")] == [5, 10]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["test/mae/all"] == 1.2 and run.data.tags["selected_route"] == "adjusted"
    assert metrics["reference/oracle_mae_all"] == 0.4 and metrics["routes/predicted_mae_all"] == pytest.approx(0.5 / 3)
    assert [m.step for m in client.get_metric_history(run_id, "test/mae/all")] == [2]  # once, at the last epoch
    assert not any("/n/" in key for key in metrics)
    assert metrics["calibration/tau"] == 0.7 and metrics["best_val/bmae/all"] == 2.5 and metrics["crt/steps"] == 30
    assert not any(key.startswith(("test/validation", "test/calibration", "test/classifier", "test/oracle"))
                   for key in metrics)
    assert {a.path for a in client.list_artifacts(run_id)} == {"checkpoint.pt", "config.yaml", "test_shot_table.md",
                                                                 "plots"}
    assert "adjusted tau 0.7 *" in Path(client.download_artifacts(run_id, "test_shot_table.md", str(tmp_path))).read_text()


def test_a_run_already_ended_keeps_its_status(store):
    tracker = Tracker(store)
    run_id = tracker.open_run("e", "r", {}, {})
    tracker.finish_run(run_id, "KILLED")
    tracker.finish_run(run_id, "FINISHED", error="late")
    run = tracker.run(run_id)
    assert run.info.status == "KILLED" and "error" not in run.data.tags


def test_run_params_name_the_data_set_and_leave_out_unset_options():
    config = Config(data="/data/agedb").to_dict()
    assert config["dataset"] == "auto" and config["label_min"] is None and config["csv"] == ""
    params = run_params(config, "agedb")  # the data set found: agedb.csv, the agedb-dir preset's
    assert params["dataset"] == "agedb-dir" and params["num_groups"] == config["num_groups"]
    assert run_params(config, "my_faces")["dataset"] == "auto"  # a CSV of no preset (given by csv=)
    assert run_params(Config(data="/d", dataset="synth").to_dict(), "agedb")["dataset"] == "synth"  # as given
    assert not {"label_min", "label_max", "csv"} & set(params)
    assert params["fds"] is False and "fds" in params  # False and 0 are settings, not unset


def test_run_pages_open_in_the_model_training_view():
    page = run_page("http://10.0.0.5:5000/", "2", "941b6609")
    assert page.startswith("http://10.0.0.5:5000/#/experiments/2/runs/941b6609")  # one slash before the #
    assert page.endswith("?workflowType=machine_learning")  # else MLflow 3 shows the run as a GenAI evaluation
