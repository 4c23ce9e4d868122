"""Training on a real local Ray: one and two DDP workers, MLflow contents, an injected worker crash,
a tracking server outage, a diverging run. Runs log over HTTP to a real MLflow tracking server, and
read the tiny data root through torch's DataLoader unless the test is about FFCV shards (two
workers logging to MLflow), which costs each run FFCV's JIT compile."""

import csv
import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from groupdir.config import load_config
from groupdir.data.shards import read_meta
from groupdir.model import Output
from groupdir.driver import train
from groupdir.errors import TrainingError
from groupdir.evaluation import evaluate_checkpoint
from groupdir.methods import Step, get_method
from groupdir.recipe import check_finite
from groupdir.server import MlflowServer
from groupdir.tracking import EPOCH_MARKER
from helpers import CrashOnce, free_port, steps_per_epoch

SHARD_RUN = {"epochs": 2, "batch_size": 64, "image_size": 32, "num_groups": 5, "lr": 2e-3}


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    return mlflow_server.uri


def run_of(tracking, run_dir):
    client = MlflowClient(tracking)
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    return client, client.get_run(run_id)


TINY_RUN = {"batch_size": 64, "image_size": 32, "num_groups": 5, "lr": 2e-3, "seed": 0}


def test_a_compiled_vanilla_run_learns(tiny_synth, tmp_path, tracking):
    """One worker reading the DIR root through torch's DataLoader, with torch.compile."""
    cfg = load_config(overrides={**TINY_RUN, "data": str(tiny_synth), "method": "vanilla", "epochs": 2,
                                 "tracking_uri": tracking, "compile": True})
    results = train(cfg, tmp_path, progress="off")
    check_the_run_learned(tiny_synth, tmp_path, tracking, cfg, results)


def test_a_groupdir_run_learns_and_its_calibration_never_sees_test_labels(tiny_synth, tmp_path, tracking):
    """A Group-DIR run learns (the checks every run passes), and a second run that differs only in
    the TEST split's labels (replaced by random ages: another order and another histogram) picks the
    same epoch, route, tau and T, and re-trains the same classifier; only their test metrics differ."""
    other = tmp_path / "other-test-labels"
    other.mkdir()
    (other / "images").symlink_to(tiny_synth / "images")
    rows = list(csv.DictReader((tiny_synth / "synth_age.csv").open()))
    rng = np.random.default_rng(0)
    for row in rows:
        if row["split"] == "test":
            row["age"] = str(int(rng.integers(0, 100)))
    with (other / "synth_age.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["age", "path", "split"])
        writer.writeheader()
        writer.writerows(rows)
    settings = {**TINY_RUN, "method": "groupdir", "epochs": 3, "crt_epochs": 1, "tracking_uri": tracking}
    results = {name: train(load_config(overrides={**settings, "data": str(root)}), tmp_path / name, progress="off")
               for name, root in (("given", tiny_synth), ("other", other))}
    check_the_run_learned(tiny_synth, tmp_path / "given", tracking,
                          load_config(overrides={**settings, "data": str(tiny_synth)}), results["given"])

    given, changed = results["given"], results["other"]
    def learned(name):  # the history without its timings
        return [{key: value for key, value in epoch.items() if key not in ("train_seconds", "images_per_second")}
                for epoch in json.loads((tmp_path / name / "history.json").read_text())]
    assert learned("given") == learned("other")  # the same training, epoch by epoch
    assert given["calibration"] == changed["calibration"] and given["best_epoch"] == changed["best_epoch"]
    assert given["validation"] == changed["validation"]
    given_head = torch.load(tmp_path / "given" / "checkpoint.pt", weights_only=True)["model"]["classifier.weight"]
    other_head = torch.load(tmp_path / "other" / "checkpoint.pt", weights_only=True)["model"]["classifier.weight"]
    torch.testing.assert_close(given_head, other_head)
    assert given["predicted"]["mae/all"] != changed["predicted"]["mae/all"]


def check_the_run_learned(tiny_synth, run_dir, tracking, cfg, results):
    """What every finished one-worker run on the tiny data root must show."""
    method, epochs = cfg.method, cfg.epochs
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert results["steps"] == history[-1]["steps"] == epochs * steps_per_epoch(64)
    expected_terms = {"train/total", "train/reg", "train/cls", "train/grc"} if method == "groupdir" \
        else {"train/total", "train/reg"}
    assert expected_terms <= set(history[0])
    assert history[-1]["train/total"] < history[0]["train/total"], "training loss did not fall"

    # The checkpoint is chosen on VALIDATION (select_metric), never on test.
    from groupdir.data import read_dir_table
    table = read_dir_table(tiny_synth)
    mean_baseline = np.abs(table.labels["val"] - table.labels["train"].mean()).mean()
    assert min(h["val/mae/all"] for h in history) < mean_baseline

    saved = json.loads((run_dir / "results.json").read_text())
    routes = {"predicted", "soft", "adjusted", "adjusted_soft", "oracle", "centroid"} if method == "groupdir" \
        else {"predicted"}
    assert routes == {key for key, value in saved.items()
                      if isinstance(value, dict) and "mae/all" in value and key != "validation"}
    assert {"mae/few", "bmae/all", "group_acc"} <= set(saved["predicted"])
    assert saved["predicted"]["n/all"] == table.size("test")  # every test row, once
    # The headline route is the best on validation (the default select_route=auto); so is its epoch.
    assert saved["selected_route"] in (("predicted", "soft", "adjusted", "adjusted_soft") if method == "groupdir"
                                       else ("predicted",))
    assert results["best_epoch"] == int(np.argmin([h["val/bmae/all"] for h in history])) + 1
    if not cfg.crt_epochs:  # re-training the classifier changes the delivered model's validation score
        assert saved["validation"]["bmae/all"] == min(h["val/bmae/all"] for h in history)  # validation, not test
    # Where rank 0's time went, in results.json and in MLflow (the demo prints it).
    phases = {"setup", "loader_wait", "train_steps", "validation", "checkpoint", "mlflow", "after_training", "test"}
    assert set(saved["timings"]) == phases and all(seconds >= 0 for seconds in saved["timings"].values())
    assert saved["timings"]["train_steps"] > 0
    _, run = run_of(tracking, run_dir)
    assert run.data.metrics["seconds/train_steps"] == pytest.approx(saved["timings"]["train_steps"])
    if method == "groupdir":
        assert saved["oracle"]["group_acc"] == 1.0 and saved["calibration"]["shift"]
        for route in ("predicted", "soft", "adjusted", "adjusted_soft"):
            assert f"val/{route}/bmae/all" in history[-1]
        best = history[results["best_epoch"] - 1]
        assert best["val/bmae/all"] == min(best[f"val/{route}/bmae/all"]
                                           for route in ("predicted", "soft", "adjusted", "adjusted_soft"))
    # `groupdir eval` on the saved checkpoint reproduces the test metrics (a compiled model is saved
    # without torch.compile's wrapper: evaluation needs no compiler).
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in state["model"])
    again = evaluate_checkpoint(run_dir / "checkpoint.pt", str(tiny_synth), "test", device="cpu")
    assert again["predicted"]["mae/all"] == pytest.approx(results["predicted"]["mae/all"], rel=1e-4)
    assert again["calibration"] == results["calibration"]


def test_two_workers_log_the_run_to_mlflow(shards, tmp_path, tracking):
    # With classifier re-training: rank 0 re-trains, and both workers must test the same classifier.
    cfg = load_config(overrides={**SHARD_RUN, "data": str(shards), "workers": 2, "tracking_uri": tracking,
                                 "crt_epochs": 3})
    results = train(cfg, tmp_path / "run", progress="off")
    assert results["workers"] == 2 and results["steps"] == 2 * steps_per_epoch(64, workers=2)
    assert results["predicted"]["n/all"] == read_meta(shards)["rows"]["test"]  # the workers' test slices, gathered, every row once

    client, run = run_of(tracking, tmp_path / "run")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["workers"] == "2" and params["num_groups"] == "5" and params["contrast_scope"] == "global"
    # Every set option, and the data set by name; unset ones (label range from the data, no csv) are left out.
    assert params["dataset"] == "synth" and not {"label_min", "label_max", "csv"} & set(params)
    assert set(params) == {key for key, value in cfg.to_dict().items() if value not in (None, "")}
    tags = run.data.tags
    assert tags["dataset"] == "synth_age" and tags["method"] == "groupdir"
    [data] = [record.dataset for record in run.inputs.dataset_inputs]  # the runs table's Dataset column
    assert (data.name, data.digest) == ("synth_age", read_meta(shards)["source_csv_sha256"][:12])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert tags["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert tags["groupdir_version"]
    for key in ("val/mae/all", "val/bmae/all", "val/group_acc", "train/grc", "train/cls", "train/reg"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    # Every log_every steps (default 20; 18 steps here: step 0 is not one), the terms, lr and rate.
    every = cfg.log_every
    for key in ("step/total", "step/grc", "step/lr", "step/images_per_second"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(every, results["steps"] + 1, every)), key
    metrics = run.data.metrics
    selected = results["selected_route"]
    assert run.data.tags["selected_route"] == selected
    assert metrics["test/mae/few"] == pytest.approx(results[selected]["mae/few"])  # the headline
    for route in ("predicted", "soft", "adjusted", "adjusted_soft", "oracle", "centroid"):
        group = "reference" if route in ("oracle", "centroid") else "routes"
        assert metrics[f"{group}/{route}_bmae_all"] == pytest.approx(results[route]["bmae/all"]), route
    assert metrics["reference/oracle_group_acc"] == 1.0
    assert {key.rsplit("/", 1)[0] for key in metrics if not key.startswith("system/")} <= {
        "test/mae", "test/mse", "test/gm", "test/bmae", "test", "routes", "reference", "best_val/mae", "best_val/mse",
        "best_val/gm", "best_val/bmae", "best_val", "val/mae", "val/mse", "val/gm", "val/bmae", "val", "train", "step",
        "test/group_acc", "val/group_acc", "best_val/group_acc",
        "calibration", "seconds", "crt", "epoch"}  # the UI's chart sections
    assert all("/" in key for key in metrics)  # nothing in the UI's catch-all section
    assert not any("/n/" in key for key in metrics)  # sample counts are in the shot table, not metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/mae/all")] == [2]  # the last epoch
    assert "Test MAE" in tags["mlflow.note.content"] and tags["mlflow.source.name"] == "groupdir train"
    assert metrics["calibration/tau"] == results["calibration"]["tau"]
    assert any(key.startswith("system/cpu") for key in metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint.pt", "config.yaml", "meta.json", "test_shot_table.md", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/per_label_mae.png", "plots/group_confusion.png", "plots/predicted_vs_true.png"}
    table = client.download_artifacts(run.info.run_id, "test_shot_table.md", str(tmp_path))
    assert f"groupdir ({selected} route)" in open(table).read()
    # Both workers evaluated one model (rank 0's BatchNorm statistics and re-trained classifier), the
    # one the checkpoint holds.
    again = evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt", str(shards), "test", device="cpu")
    for route in ("predicted", "adjusted_soft"):
        assert again[route]["mae/all"] == pytest.approx(results[route]["mae/all"], rel=1e-5)


def test_a_crashed_worker_and_a_tracking_outage_lose_nothing_and_log_nothing_twice(tiny_synth, tmp_path):
    """Two faults in one run, on its own tracking server. The last worker dies in the middle of epoch
    2 and Ray restarts both from epoch 1's checkpoint; the server stops once epoch 1 is in MLflow and
    comes back once epoch 2 is checkpointed. Training goes on through both, and in the end MLflow
    holds every epoch and every log_every-th step exactly once, the test results, plots and checkpoint."""
    run_dir, log_every, steps = tmp_path / "run", 2, steps_per_epoch(64, workers=2)
    server = MlflowServer(tmp_path / "store", port=free_port()).start()
    cfg = load_config(overrides={**SHARD_RUN, "image_size": 16, "epochs": 3, "data": str(tiny_synth), "workers": 2,
                                 "tracking_uri": server.uri, "max_failures": 1, "log_every": log_every,
                                 "tracking_patience": 300})
    marker, events, failures = tmp_path / "crashed", [], []

    def outage():
        try:
            wait_for(lambda: (run_dir / "run.json").exists())
            run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
            wait_for(lambda: MlflowClient(server.uri).get_metric_history(run_id, EPOCH_MARKER))
            server.stop()
            events.append("stopped")
            wait_for(lambda: checkpointed_epochs(run_dir) >= 2)
            server.start()
            events.append("restarted")
        except Exception as err:  # re-raised by the test below
            failures.append(err)

    watcher = threading.Thread(target=outage)
    watcher.start()
    try:
        results = train(cfg, run_dir, progress="off", worker_loop=CrashOnce(steps + 3, marker))
    finally:
        watcher.join()
        try:
            assert not failures, failures
            assert events == ["stopped", "restarted"] and marker.exists()  # both faults happened
            assert results["steps"] == 3 * steps  # what an uninterrupted run takes, no step repeated
            assert [h["epoch"] for h in json.loads((run_dir / "history.json").read_text())] == [1, 2, 3]
            client, run = run_of(server.uri, run_dir)
            assert run.info.status == "FINISHED"
            for key in (EPOCH_MARKER, "val/mae/all", "train/total", "epoch/steps"):
                assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
            assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch/steps")] == [steps, 2 * steps, 3 * steps]
            logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "step/total"))
            assert logged == list(range(log_every, results["steps"] + 1, log_every))
            assert run.data.metrics["test/mae/all"] == pytest.approx(results[results["selected_route"]]["mae/all"])
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"checkpoint.pt", "config.yaml", "test_shot_table.md", "plots"} <= artifacts
        finally:
            server.stop()


def wait_for(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def checkpointed_epochs(run_dir: Path) -> int:
    """The most epochs any of the run's Ray checkpoints holds (0 while none is complete)."""
    counts = [0]
    for history in run_dir.glob("ray/*/checkpoint_*/history.json"):
        try:
            counts.append(len(json.loads(history.read_text())))
        except (OSError, ValueError):  # being written
            pass
    return max(counts)


def test_a_diverging_run_stops_at_once_naming_the_term_and_step(tiny_synth, tmp_path, tracking):
    cfg = load_config(overrides={**SHARD_RUN, "image_size": 16, "data": str(tiny_synth), "workers": 2,
                                 "tracking_uri": tracking,
                                 "lr": 1e30, "max_failures": 2})
    with pytest.raises(TrainingError, match=r"^loss term '\w+' is (nan|inf|-inf) at epoch 1, step \d+"):
        train(cfg, tmp_path / "run", progress="off")
    assert not (tmp_path / "run" / "results.json").exists()
    _, run = run_of(tracking, tmp_path / "run")
    assert run.info.status == "FAILED"
    # Stopped for good: a rerun of the same command says so again instead of training on.
    with pytest.raises(TrainingError, match="loss term"):
        train(cfg, tmp_path / "run", progress="off")


def test_summed_group_loss_weighs_the_mean_by_the_global_batch():
    """soft_reduction=sum is the authors' summed loss: the mean times the GLOBAL batch, whatever the
    number of workers each holds a slice of it."""
    generator = torch.Generator().manual_seed(0)
    output = Output(torch.randn(8, 4, generator=generator), torch.randn(8, 5, generator=generator),
                    torch.randn(8, 5, generator=generator))
    labels, groups = torch.rand(8, generator=generator) * 50, torch.arange(8) % 5
    step = Step(output, labels, groups, bins=labels.long(), weights=None, group_log_prior=None, number=0, state=None)
    terms = {reduction: get_method("groupdir").loss_terms(
                 load_config(overrides={"soft_reduction": reduction, "batch_size": 128, "workers": 2,
                                        "lambda_soft": 0.5}), step)
             for reduction in ("mean", "sum")}
    torch.testing.assert_close(terms["sum"]["cls"], 128 * terms["mean"]["cls"])
    torch.testing.assert_close(terms["sum"]["total"] - terms["mean"]["total"], 0.5 * 127 * terms["mean"]["cls"])


def test_non_finite_loss_names_the_term_and_step():
    with pytest.raises(TrainingError, match="loss term 'grc' is nan at epoch 2, step 17"):
        check_finite({"total": 1.0, "grc": float("nan")}, epoch=1, step=17)
