import pytest

from groupdir.errors import ConfigError
from groupdir.tracking import Tracker, check_reachable, resolve_uri


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


def test_epochs_already_in_mlflow_are_not_logged_again(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    run_id = tracker.open_run("e", "r", {"lr": 0.1}, {"method": "groupdir"})
    assert tracker.open_run("e", "r", {}, {}, run_id=run_id) == run_id  # a resumed run reopens its run
    with tracker.system_metrics(run_id):
        history = [{"epoch": 1, "train/total": 3.0}, {"epoch": 2, "train/total": 2.0}]
        tracker.log_epochs(run_id, history[:1])
        tracker.log_epochs(run_id, history)  # after a restart the whole history comes again
        tracker.log_epochs(run_id, history + [{"epoch": 3, "train/total": float("nan"), "val/mae/all": 1.0}])
        tracker.log_epochs(run_id, history + [{"epoch": 3, "train/total": float("nan"), "val/mae/all": 1.0}])
        assert not tracker.final_logged(run_id)
        results = {"predicted": {"mae/all": 1.5, "mae/few": float("nan")}, "adjusted": {"mae/all": 1.2},
                   "oracle": {"mae/all": 0.4}, "selected_route": "adjusted",
                   "calibration": {"shift": [0.1, -0.1], "tau": 0.7, "soft_tau": 1.0, "route_temperature": 0.5,
                                   "selected_route": "adjusted"},
                   "validation": {"bmae/all": 2.5}, "classifier_retraining": {"crt/steps": 30},
                   "best_epoch": 2, "steps": 20}
        tracker.log_results(run_id, results, {"lr": 0.1}, "table", {})
        assert tracker.final_logged(run_id)  # a resumed driver's workers skip the final logging
    assert tracker.run(run_id).info.status == "RUNNING"  # the driver ends the run, not the monitor
    tracker.finish_run(run_id, "KILLED")
    tracker.finish_run(run_id, "FINISHED", error="late")  # a run already ended keeps its status
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test/mae/all"] == 1.2 and client.get_run(run_id).data.tags["selected_route"] == "adjusted"
    assert metrics["test/predicted/mae/all"] == 1.5 and metrics["test/oracle/mae/all"] == 0.4
    assert metrics["calibration/tau"] == 0.7 and metrics["best_val/bmae/all"] == 2.5 and metrics["crt/steps"] == 30
    assert not any(key.startswith(("test/validation", "test/calibration", "test/classifier")) for key in metrics)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/total")] == [(1, 3.0), (2, 2.0)]
    # epoch 3's NaN is left out (MLflow cannot plot it); its other metrics are there
    assert [m.step for m in client.get_metric_history(run_id, "val/mae/all")] == [3]
    assert client.get_run(run_id).data.params == {"lr": "0.1"}
    assert client.get_run(run_id).info.status == "KILLED" and "error" not in client.get_run(run_id).data.tags
