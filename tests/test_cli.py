"""The command line end to end (slow), and its refusals of unusable checkpoints and outputs, which
come before any data is read or Ray starts (fast)."""

import json
import os

import numpy as np
import pytest
import ray
import torch
import yaml

from groupdir.cli import main
from helpers import TRAIN_ROWS, saved_checkpoint, steps_per_epoch


@pytest.fixture(autouse=True)
def tracking(tmp_path, monkeypatch):
    """The CLI reads MLFLOW_TRACKING_URI; point it at a store of the test's own."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.mark.slow  # trains
def test_prepare_train_eval_from_the_command_line(tiny_synth, tmp_path, capsys):
    shards = tmp_path / "shards"
    assert main(["prepare", "--root", str(tiny_synth), "--out", str(shards), "--dataset", "synth",
                 "--max-resolution", "32", "--workers", "1"]) == 0
    assert f"train {TRAIN_ROWS}" in capsys.readouterr().out
    assert main(["prepare", "--root", str(tiny_synth), "--out", str(shards)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["prepare", "--root", str(tiny_synth), "--out", str(tmp_path / "x"), "--num-shards", "5000"]) == 2
    assert "fewer than --num-shards 5000" in capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["train", "--data", str(shards), "--out", str(run), "--config", "paper", "epochs=1",
                 "batch_size=64", "num_groups=4", "image_size=16"]) == 0
    out = capsys.readouterr().out
    assert "groupdir (predicted route)" in out  # the packaged paper config routes by the predicted group
    for route in ("adjusted tau", "adjusted_soft tau", "oracle", "centroid"):
        assert f"  {route}" in out, route
    results = json.loads((run / "results.json").read_text())
    test_rows = json.loads((shards / "meta.json").read_text())["rows"]["test"]
    assert results["predicted"]["n/all"] == test_rows  # every test row, read from the shards
    assert (run / "checkpoint.pt").is_file()

    # A finished run is not overwritten without --force.
    assert main(["train", "--data", str(tiny_synth), "--out", str(run), "epochs=1"]) == 2
    assert "already holds a finished run" in capsys.readouterr().err

    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(tiny_synth),
                 "--split", "val", "--json", str(tmp_path / "val.json")]) == 0
    out, err = capsys.readouterr()
    assert "adjusted_soft tau" in out
    assert "\nbatches predicted: 0/" in f"\n{err}" and "\r" not in err  # stderr is no terminal here
    evaluated = json.loads((tmp_path / "val.json").read_text())
    assert "mae/all" in evaluated["predicted"] and evaluated["selected_route"] == "predicted"
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(tiny_synth),
                 "--json", str(tmp_path / "val.json")]) == 2
    assert "pass --force" in capsys.readouterr().err

    # A checkpoint that is not one fails with one line, not a traceback.
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(tmp_path / "bad.pt"), "--data", str(tiny_synth)]) == 2
    assert "bad.pt is truncated or not a torch file" in capsys.readouterr().err
    # One from before routes were calibrated is refused, not evaluated with made-up settings.
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["calibration"]
    torch.save(state, tmp_path / "old.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "old.pt"), "--data", str(tiny_synth)]) == 2
    assert "old.pt has no route calibration" in capsys.readouterr().err


@pytest.mark.slow  # starts Ray
def test_user_errors_exit_2_with_one_clear_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--config", "papr"]) == 2
    assert "no packaged config of that name; packaged: agedb-dir, agedb-dir-balanced-mse, agedb-dir-conr" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "num_groups=banana"]) == 2
    assert "num_groups='banana': expected an integer" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "s"), "--train", "200", "--image-size", "16"]) == 0
    assert main(["synth", str(tmp_path / "s"), "--train", "200"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "s"), "num_groups=500"]) == 2
    assert "exceeds the" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "s"), "workers=2", "batch_size=2"]) == 2
    assert "must split evenly" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "s"), "num_groups=5", "tracking_uri=http://127.0.0.1:9"]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "num_groups=5",
                 "workers=64"]) == 2
    assert "needs 64 CPUs" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "num_groups=5",
                 "device=cuda", "gpus_per_worker=0.5"]) == 2
    assert "needs whole GPUs" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "num_groups=5",
                 "device=cuda"]) == 2
    assert "needs more GPUs than the 0 here" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "s"), "num_groups=5", "batch_size=256"]) == 2
    assert "exceeds the 200 training rows" in capsys.readouterr().err
    # FDS smooths over the training labels' bins: a kernel wider than them is refused before Ray.
    assert main(["train", "--data", str(tmp_path / "s"), "method=vanilla", "fds=true", "fds_ks=999"]) == 2
    assert "method=vanilla fds=true on these training labels: reflect padding needs" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "s"), "init_from=" + str(tmp_path / "none.pt")]) == 2
    assert f"checkpoint {tmp_path / 'none.pt'} not found" in capsys.readouterr().err
    assert not ray.is_initialized()  # each was refused before training (Ray stopped or never started)
    assert not (tmp_path / "r").exists()  # ... and before anything was written: a corrected rerun just runs


@pytest.mark.slow  # trains in a subprocess
def test_a_killed_driver_is_resumed_by_the_same_command(tiny_synth, tmp_path, tracking):
    import os
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    run = tmp_path / "run"
    command = [sys.executable, "-m", "groupdir.cli", "train", "--data", str(tiny_synth), "--out", str(run),
               "epochs=2", "batch_size=64", "num_groups=4", "image_size=16"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(run.glob("ray/*/checkpoint_*")):  # the first epoch is checkpointed
        assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
        time.sleep(0.5)
    driver.kill()  # SIGKILL: no clean-up of any kind; the embedded Ray dies with its driver
    driver.wait()
    assert not (run / "results.json").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming the run in {run}" in again.stdout
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["steps"] == 2 * steps_per_epoch(64)
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("groupdir").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, resumed
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/mae/all")] == [1, 2]
    assert (run / "checkpoint.pt").is_file() and not (run / "ray").exists()  # Ray's checkpoints go at the end


def synth_command(out, *flags) -> list[str]:
    return [*flags, "synth", str(out), "--train", "50", "--image-size", "16", "--eval-cap", "1"]


def test_synth_prints_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert main(synth_command(tmp_path / "s")) == 0  # pytest's captured stderr is no terminal
    out, err = capsys.readouterr()
    images = len((tmp_path / "s" / "synth_age.csv").read_text().splitlines()) - 1
    lines = err.splitlines()
    assert "\r" not in err
    assert lines[0] == f"images written: 0/{images}" and lines[-1].startswith(f"images written: {images}/{images} in ")
    assert 3 <= len(lines) <= 11
    assert out.startswith(f"wrote {tmp_path / 's' / 'synth_age.csv'} in ") and out.count("\n") == 1


def test_quiet_leaves_the_result_line_alone(tmp_path, capsys):
    assert main(synth_command(tmp_path / "s", "--quiet")) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"wrote {tmp_path / 's' / 'synth_age.csv'} in ") and out.count("\n") == 1
    assert main(synth_command(tmp_path / "s", "-q")) == 2  # errors are still printed
    assert capsys.readouterr().err.startswith("groupdir synth: error: ")


# ------------------- refused before any data is read or Ray starts -------------------

def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"groupdir {command}: error: ") and err.count("\n") == 1, err
    return err


def test_eval_refuses_a_truncated_checkpoint_and_data_of_another_label_range(tiny_synth, tmp_path, capsys):
    narrow = saved_checkpoint(tmp_path / "checkpoint.pt", np.arange(40.0, 61.0), num_groups=4)
    half = tmp_path / "half.pt"
    half.write_bytes(narrow.read_bytes()[:narrow.stat().st_size // 2])
    assert main(["eval", "--checkpoint", str(half), "--data", str(tiny_synth)]) == 2
    assert f"checkpoint {half} is truncated or not a torch file" in one_line_error(capsys, "eval")
    assert main(["eval", "--checkpoint", str(narrow), "--data", str(tiny_synth), "--json", str(tmp_path / "m.json")]) == 2
    assert (f"checkpoint {narrow} was trained for labels 40 to 60 (4 groups); the test split of {tiny_synth} has "
            f"labels 0 to 99") in one_line_error(capsys, "eval")
    assert not (tmp_path / "m.json").exists()


# Every command that writes, with its output at {out}; whatever else it reads does not exist, so a
# refusal that came after the output check would be another message.
WRITERS = {
    "train": ["train", "--data", "{missing}", "--out", "{out}"],
    "tune": ["tune", "--space", "{space}", "--data", "{missing}", "--out", "{out}"],
    "demo": ["demo", "--out", "{out}"],
    "prepare": ["prepare", "--root", "{missing}", "--out", "{out}"],
    "synth": ["synth", "{out}"],
    "bench loader": ["bench", "loader", "--out", "{out}"],
    "bench method": ["bench", "method", "--data", "{missing}", "--out", "{out}"],
    "bench train": ["bench", "train", "--data", "{missing}", "--out", "{out}"],
    "bench loss": ["bench", "loss", "--out", "{out}"],
    "bench ceiling": ["bench", "ceiling", "--out", "{out}"],
    "eval --json": ["eval", "--checkpoint", "{missing}", "--data", "{missing}", "--json", "{out}"],
}


def blocked_output(tmp_path, case: str, writer: str):
    """(an output path that cannot be written, the refusal that names it)."""
    blocker = tmp_path / "blocker"
    if case == "a file in place of a parent folder":
        blocker.write_text("")
        return blocker / "out", f"{blocker} is a file, not a folder"
    if case == "the other kind at the output's path":
        if writer == "eval --json":  # a file is wanted there
            blocker.mkdir()
            return blocker, "it is a folder, not a file"
        blocker.write_text("")
        return blocker, "it is a file, not a folder"
    blocker.mkdir(mode=0o555)  # no permission
    return blocker / "out", f"no permission to write in {blocker}"


@pytest.mark.parametrize("case", ["a file in place of a parent folder", "the other kind at the output's path",
                                  "a folder without write permission"])
@pytest.mark.parametrize("writer", WRITERS)
def test_an_output_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, capsys, writer, case):
    if case == "a folder without write permission" and os.geteuid() == 0:
        pytest.skip("root may write in any folder, whatever its mode: the check (os.access) passes, as the write would")
    out, reason = blocked_output(tmp_path, case, writer)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"fixed": {"epochs": 1}, "space": {"lr": {"choice": [0.1, 0.2]}}}))
    before = sorted(tmp_path.rglob("*"))
    argv = [arg.format(out=out, missing=tmp_path / "missing", space=space) for arg in WRITERS[writer]]
    assert main(argv) == 2
    assert one_line_error(capsys, argv[0]).rstrip("\n").endswith(f"error: cannot write {out}: {reason}")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    assert not ray.is_initialized()
