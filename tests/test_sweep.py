"""Sweeps on a real local Ray and MLflow: nesting, the best trial, a failing trial, ASHA, a sweep
interrupted (Ctrl-C) or whose driver was killed (SIGKILL) resumed, and bad search spaces refused
before Ray starts. The trials read the tiny
data root through torch's DataLoader (FFCV's JIT compile would cost every trial half a minute)."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient

from groupdir import sweep
from groupdir.cli import main
from groupdir.errors import ConfigError
from groupdir.tracking import EPOCH_MARKER
from helpers import FailWhen

REPO = Path(__file__).resolve().parents[1]
TINY = {"epochs": 2, "image_size": 16, "batch_size": 64, "num_groups": 5}


@pytest.fixture(autouse=True)
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def space_file(folder: Path, space: dict, fixed: dict = TINY, **top) -> str:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({**top, "fixed": fixed, "space": space}))
    return str(path)


def sweep_runs(tracking, experiment: str = ""):
    """(parent, children) of the one sweep in the store (in `experiment`, when given)."""
    client = MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()
                               if not experiment or e.name == experiment])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return client, parents[0], children


def val_history(client, run, metric="val/bmae/all"):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]


# ------------------- refused before Ray starts (first: no test has started Ray yet) -------------------

@pytest.mark.parametrize("space, message", [
    ({"num_grups": {"choice": [5, 10]}}, "unknown config key 'num_grups'"),
    ({"num_groups": {"choice": []}}, "choice needs a non-empty list"),
    ({"temperature": {"uniform": [5.0, 1.0]}}, "low=5.0 must be below high=1.0"),
    ({"temperature": {"loguniform": [0.0, 1.0]}}, "loguniform needs low > 0"),
    ({"temperature": {"normal": [1, 2]}}, "unknown kind 'normal'"),
    ({"num_groups": {"uniform": [2, 10]}}, "uniform is for real-valued keys"),
    ({"num_groups": {"choice": [1, 5]}}, "the value 1 is refused: method=groupdir needs num_groups >= 2"),
    ({"workers": {"choice": [1, 2]}}, "workers is the same for every trial"),
    ({"epochs": {"choice": [2, 3]}}, "epochs is both searched and fixed"),
    ({"head": {"choice": {"a": {"group_los": "ce"}}}}, "unknown config key 'group_los'"),
    ({"head": {"choice": {"a": {"epochs": 3}}}}, "epochs is both searched and fixed"),
    ({"beta": {"choice": {"a": {"group_loss": "ce"}}}}, "a bundle's name must not be a config key"),
    ({"head": {"choice": {"a": {"beta": 2.0}}}, "beta": {"uniform": [0.5, 1.0]}}, "beta is searched twice"),
    ({"head": {"choice": {"a": "ce"}}}, "maps each name to a mapping of config keys"),
    ({"head": {"choice": {"a": {"group_loss": "cross"}}}}, "the value 'a' is refused: group_loss='cross'"),
])
def test_bad_spaces_are_refused_naming_file_and_key(tmp_path, space, message):
    path = space_file(tmp_path, space, fixed={"epochs": 2})
    with pytest.raises(ConfigError) as refused:
        sweep.sweep_config(sweep.load_space(path), [])
    assert message in str(refused.value) and "space.yaml" in str(refused.value)


@pytest.mark.parametrize("top, message", [
    ({"trails": 3}, "unknown key 'trails'"),
    ({"trials": 0}, "trials=0 must be an integer > 0"),
    ({"asha": {"grace_period": -1}}, "asha.grace_period=-1 must be an integer >= 0"),
    ({"asha": {"reduction_factor": 1}}, "asha.reduction_factor=1 must be a finite number > 1"),
    ({"fixed": [1]}, "fixed=[1]: expected a mapping"),
])
def test_bad_space_files_are_refused_naming_the_setting(tmp_path, top, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"space": {"lr": {"choice": [0.1, 0.2]}}, **top}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        sweep.load_space(path)
    path.write_text(yaml.safe_dump({"space": {}}))
    with pytest.raises(ConfigError, match="space must not be empty"):
        sweep.load_space(path)


@pytest.mark.slow
def test_a_bad_space_stops_the_command_before_ray_and_mlflow(shards, tmp_path, capsys):
    assert not ray.is_initialized()
    space = space_file(tmp_path, {"num_groups": {"choice": [5, 5000]}}, fixed={"epochs": 2})  # > labels
    assert main(["tune", "--space", space, "--data", str(shards), "--out", str(tmp_path / "sweep")]) == 2
    error = capsys.readouterr().err
    assert "space.num_groups: the value 5000 is refused" in error
    assert not ray.is_initialized() and not (tmp_path / "sweep").exists() and not (tmp_path / "mlflow.db").exists()

    space = space_file(tmp_path, {"temperature": {"uniform": [1.0, 2.0]}}, fixed={"epochs": 2})
    assert main(["tune", "--space", space, "--data", str(shards), "temperature=2"]) == 2
    assert "temperature is both searched and fixed (on the command line)" in capsys.readouterr().err
    assert main(["tune", "--space", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read search space" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["quick", "groups", "paper", "full", "method", "baselines"])
def test_shipped_spaces_are_valid(name):
    spec = sweep.load_space(REPO / "tune" / f"{name}.yaml")
    cfg = sweep.sweep_config(spec, [])
    assert spec.total_trials >= (8 if name != "paper" else 32)
    soft_weights = [p.values for p in spec.params if p.key == "lambda_soft"]
    assert all(high >= 128 for _, high in soft_weights)  # the authors' summed loss, in our mean convention
    if name == "method":
        contrast = next(p for p in spec.params if p.key == "contrast")
        assert {"similarity": "euclidean", "temperature": 0.07} in contrast.bundles.values()
        assert cfg.select_route == "auto"
    if name == "groups":
        assert spec.params[0].values == [2, 5, 10, 15, 20, 25, 40, 50] and spec.grace_period == 0
    if name == "baselines":  # every bundle was built into a valid config by sweep_config
        baseline = next(p for p in spec.params if p.key == "baseline")
        assert {bundle["method"] for bundle in baseline.bundles.values()} == {"vanilla", "ranksim", "balanced_mse", "conr"}
    if name == "quick":
        assert cfg.epochs <= 4 and cfg.image_size <= 32 and cfg.backbone == "resnet18"


def test_asha_never_judges_a_trials_last_epoch():
    """The last epoch's report carries the test evaluation: even a trial far behind gets to finish."""
    from ray.tune.schedulers import TrialScheduler

    def fresh():
        scheduler = sweep.ASHABeforeLastEpoch(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2,
                                              stop_last_trials=False)
        scheduler.set_search_properties("val/bmae/all", "min")
        for trial in ("good", "bad"):
            scheduler.on_trial_add(None, Trial(trial))
        return scheduler

    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    for epoch in (1, 2, 4):
        scheduler = fresh()
        assert scheduler.on_trial_result(None, Trial("good"), {"epoch": epoch, "epochs": 4, "val/bmae/all": 10.0}) \
            == TrialScheduler.CONTINUE
        verdict = scheduler.on_trial_result(None, Trial("bad"), {"epoch": epoch, "epochs": 4, "val/bmae/all": 50.0})
        assert verdict == (TrialScheduler.CONTINUE if epoch == 4 else TrialScheduler.STOP), epoch


# ------------------------------------- sweeps on Ray -------------------------------------

@pytest.mark.slow
def test_sweep_nests_every_trial_under_one_parent(tiny_synth, tmp_path, mlflow_server, local_ray, capsys, monkeypatch):
    """Against a real tracking server, over HTTP (its own experiment there)."""
    tracking, experiment = mlflow_server.uri, f"sweep-{tmp_path.name}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    heads = {"ce": {"group_loss": "ce", "beta": 2.0}, "soft": {"group_loss": "soft", "beta": 0.5}}
    space = space_file(tmp_path, {"num_groups": {"choice": [2, 5]}, "temperature": {"loguniform": [0.1, 5.0]},
                                  "head": {"choice": heads}},
                       fixed={**{k: v for k, v in TINY.items() if k != "num_groups"}, "log_every": 5}, trials=2)
    command = ["tune", "--space", space, "--data", str(tiny_synth), "--out", str(tmp_path / "sweep"),
               f"experiment={experiment}"]
    assert main(command) == 0
    assert "best on validation" in capsys.readouterr().out

    client, parent, children = sweep_runs(tracking, experiment)
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert len({child.data.params["temperature"] for child in children}) == 2, "Optuna drew the same point twice"
    for child in children:
        assert child.data.params["num_groups"] in ("2", "5") and 0.1 <= float(child.data.params["temperature"]) <= 5
        bundle = heads[child.data.params["head"]]  # a bundle's name is the param; its keys reach the config
        assert child.data.params["group_loss"] == bundle["group_loss"] and float(child.data.params["beta"]) == bundle["beta"]
        judged = val_history(client, child)[:int(child.data.tags.get("stopped_epoch", 99))]
        assert child.data.metrics["best_val/bmae/all"] == min(judged)
        if child.info.status == "FINISHED":
            assert {"test/mae/all", "test/bmae/all", "step/total", "step/lr"} <= set(child.data.metrics)
            assert len(val_history(client, child)) == TINY["epochs"]
            artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
            assert "plots/per_label_mae.png" in artifacts and "checkpoint.pt" in {
                a.path for a in client.list_artifacts(child.info.run_id)}
        else:  # stopped by ASHA: said so, never tested
            assert child.info.status == "KILLED" and child.data.tags["stopped_early"].startswith("ASHA")
            assert "test/mae/all" not in child.data.metrics

    assert {record.dataset.name for run in (parent, *children) for record in run.inputs.dataset_inputs} == {"synth_age"}
    for child in children:  # named by Tune's trial id and what it tries
        name, params = child.info.run_name, child.data.params
        assert name.startswith(f"{child.data.tags['trial_id']} ") and f" num_groups={params['num_groups']}" in name
        assert f" head={params['head']}" in name, name
    finished = [child for child in children if child.info.status == "FINISHED"]
    best = min(finished, key=lambda child: min(val_history(client, child)))
    assert parent.data.tags["best_run_id"] == best.info.run_id
    # The parent's row carries the best trial's settings and results under the trials' own names.
    assert parent.data.params["temperature"] == best.data.params["temperature"]
    assert parent.data.params["head"] == best.data.params["head"]
    assert parent.data.metrics["best_val/bmae/all"] == best.data.metrics["best_val/bmae/all"] == min(val_history(client, best))
    assert parent.data.metrics["test/mae/all"] == best.data.metrics["test/mae/all"]
    assert {"trials.csv", "trials.md", "plots"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/params_vs_metric.png"]
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").open()))
    assert sorted(row["mlflow_run_id"] for row in rows) == sorted(child.info.run_id for child in children)
    assert rows[0]["mlflow_run_id"] == best.info.run_id  # best first
    assert (tmp_path / "sweep" / "trials" / best.data.tags["trial_id"] / "checkpoint.pt").is_file()
    assert not (tmp_path / "sweep" / "ray").exists()  # Ray's checkpoints go when the sweep ends

    # A finished sweep's folder is not reused by mistake.
    assert main(command) == 2
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_asha_stops_a_trial_that_falls_behind_and_a_failing_trial_is_failed(tiny_synth, tmp_path, tracking, local_ray):
    # One trial at a time, in grid order: a sane lr; then lr=10, whose first epoch leaves the network's
    # outputs far off every label: at the first rung (epoch 1) it is worse than the only other result,
    # so ASHA must stop it, while the sane trial is first at its rungs and goes on; then a trial whose
    # workers raise (max_failures=0: Ray Train gives it up), which must end FAILED with its error
    # while the sweep goes on.
    spec = sweep.load_space(space_file(tmp_path, {"lr": {"grid": [0.002, 10.0, 0.003]}},
                                       fixed={**TINY, "epochs": 2, "max_failures": 0},
                                       asha={"grace_period": 1, "reduction_factor": 2}), max_concurrent=1)
    cfg = sweep.sweep_config(spec, [f"data={tiny_synth}", f"tracking_uri={tracking}"])
    summary = sweep.run_sweep(spec, cfg, tmp_path / "sweep", worker_loop=FailWhen("lr", 0.003))

    client, parent, children = sweep_runs(tracking)
    by_lr = {float(child.data.params["lr"]): child for child in children}
    kept, stopped, failed = by_lr[0.002], by_lr[10.0], by_lr[0.003]
    assert stopped.info.status == "KILLED" and stopped.data.tags["stopped_early"] == "ASHA after epoch 1"
    assert stopped.data.tags["stopped_epoch"] == "1"
    assert len(val_history(client, stopped)) < 2 and "test/mae/all" not in stopped.data.metrics
    assert kept.info.status == "FINISHED" and len(val_history(client, kept)) == 2
    assert failed.info.status == "FAILED" and "injected failure: lr=0.003" in failed.data.tags["error"]
    assert "test/mae/all" not in failed.data.metrics
    assert parent.info.status == "FINISHED" and parent.data.tags["best_run_id"] == kept.info.run_id
    assert {key: parent.data.metrics[f"trials/{key}"] for key in ("finished", "stopped_early", "failed")} == \
        {"finished": 1, "stopped_early": 1, "failed": 1}
    assert summary["best"]["run_id"] == kept.info.run_id


def interrupted_sweep(tiny_synth, tmp_path, tracking, stop, trials: int = 2) -> tuple[list[str], str, int]:
    """A sweep of `trials` trials (one at a time, 2 epochs each) in a driver process of its own,
    stopped by `stop(process)` once the trials before the last have finished and the last has logged
    an epoch and is in Tune's saved state (a killed driver leaves only Tune's last periodic save: a
    trial not in it would be drawn anew on resume). Returns the command, the driver's output and
    its exit status."""
    space = space_file(tmp_path, {"temperature": {"loguniform": [0.5, 5.0]}}, fixed={**TINY, "epochs": 2},
                       trials=trials, asha=False)
    command = ["tune", "--space", space, "--data", str(tiny_synth), "--out", str(tmp_path / "sweep"),
               "--max-concurrent", "1"]
    process = subprocess.Popen([sys.executable, "-m", "groupdir.cli", *command], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    seen = []
    for line in process.stdout:  # once the first trial has finished and the second has started ...
        seen.append(line)
        if sum(" started:" in s for s in seen) == trials and sum(" finished:" in s for s in seen) == trials - 1:
            break
    second = seen[-1].split()[0]
    client = MlflowClient(tracking)
    for _ in range(240):  # ... and trained an epoch of its 2, and Tune has saved it: stop
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.trial_id = '{second}'")
        saved = [path.read_text() for path in (tmp_path / "sweep" / "tune").glob("experiment_state-*.json")]
        if runs and client.get_metric_history(runs[0].info.run_id, EPOCH_MARKER) and any(second in text for text in saved):
            break
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"trial {second} logged no epoch, or Tune saved no state with it, in 2 minutes")
    stop(process)
    output = "".join(seen) + process.communicate(timeout=180)[0]
    return command, output, process.returncode


def runs_after_the_stop(tracking, status: str, output: str):
    """(the parent run, the finished first trial's, the cut-off second trial's), the parent and the
    second in `status`."""
    _, parent, children = sweep_runs(tracking)
    assert parent.info.status == status
    assert sorted(child.info.status for child in children) == sorted(["FINISHED", status]), output
    first = next(child for child in children if child.info.status == "FINISHED")
    second = next(child for child in children if child.info.status == status)
    return parent, first, second


def assert_resumes_with_one_run_per_trial(command: list[str], tracking, parent, first, second) -> None:
    assert main([*command, "--resume"]) == 0
    client, resumed_parent, children = sweep_runs(tracking)
    assert resumed_parent.info.run_id == parent.info.run_id and resumed_parent.info.status == "FINISHED"
    assert len(children) == 2 and {child.info.status for child in children} == {"FINISHED"}
    assert len({child.data.tags["trial_id"] for child in children}) == 2
    ids = {child.info.run_id: child for child in children}
    assert first.info.run_id in ids and second.info.run_id in ids  # the same runs, not new ones
    assert ids[first.info.run_id].info.end_time == first.info.end_time, "a finished trial ran again"
    for child in children:  # every epoch logged exactly once, the interrupted trial's too
        steps = [m.step for m in client.get_metric_history(child.info.run_id, EPOCH_MARKER)]
        assert sorted(steps) == [1, 2], (child.data.tags["trial_id"], steps)


@pytest.mark.slow
def test_an_interrupted_sweep_marks_what_it_cut_off_and_says_how_to_resume(tiny_synth, tmp_path, tracking, local_ray):
    """Ctrl-C in the middle of a trial: Tune saves its state, the command marks what it cut off and
    says how to resume. The resume itself takes the same path as after a SIGKILL (the test below,
    which also has a finished trial that must not run again)."""
    command, output, status = interrupted_sweep(tiny_synth, tmp_path, tracking,
                                                lambda process: process.send_signal(signal.SIGINT), trials=1)
    assert status == 130, output
    assert "--resume" in output
    _, parent, children = sweep_runs(tracking)
    assert parent.info.status == "KILLED" and len(children) == 1, output
    assert children[0].info.status == "KILLED" and children[0].data.tags["interrupted"] == "true"


@pytest.mark.slow
def test_a_sweep_whose_driver_was_killed_resumes_with_one_run_per_trial(tiny_synth, tmp_path, tracking, local_ray):
    """SIGKILL: no clean-up at all; the embedded Ray's head dies with its driver, the runs it had
    open stay RUNNING, and --resume restores Tune's last periodic save."""
    command, output, status = interrupted_sweep(tiny_synth, tmp_path, tracking, lambda process: process.kill())
    assert status == -signal.SIGKILL, output
    parent, first, second = runs_after_the_stop(tracking, "RUNNING", output)
    assert_resumes_with_one_run_per_trial(command, tracking, parent, first, second)
