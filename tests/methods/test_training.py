"""Every DIR baseline trains end to end on two Ray Train workers (tiny data, one epoch), and its
checkpoint evaluates to the run's own test results; a linear probe keeps the RnC run's encoder (the
two-stage Group-DIR runs are the method benchmark's, tests/test_bench.py). Global-batch equality
itself is tested without Ray in test_global_batch.py."""

import json

import pytest
import torch

from groupdir.config import load_config
from groupdir.driver import train
from groupdir.evaluation import evaluate_checkpoint
from helpers import steps_per_epoch

TINY = {"epochs": 1, "batch_size": 32, "image_size": 16, "num_groups": 5, "workers": 2, "seed": 0}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def run(tiny_synth, run_dir, tracking, **settings) -> dict:
    cfg = load_config(overrides={**TINY, "data": str(tiny_synth), "tracking_uri": tracking, **settings})
    results = train(cfg, run_dir, progress="off")
    history = json.loads((run_dir / "history.json").read_text())
    assert results["workers"] == 2 and len(history) == 1
    again = evaluate_checkpoint(run_dir / "checkpoint.pt", str(tiny_synth), "test", device="cpu")
    assert again["predicted"]["mae/all"] == pytest.approx(results["predicted"]["mae/all"], rel=1e-5)
    return {"results": results, "history": history[0], "model": torch.load(run_dir / "checkpoint.pt")["model"]}


@pytest.mark.parametrize("settings, terms", [
    ({"method": "ranksim", "fds": True}, {"reg", "ranksim"}),
    ({"method": "balanced_mse", "balanced_mse": "bmc", "noise_sigma": 3.0}, {"balanced_mse", "noise_sigma"}),
    ({"method": "conr"}, {"reg", "conr"}),
])
def test_each_baseline_trains_on_two_workers(tiny_synth, tmp_path, tracking, settings, terms):
    trained = run(tiny_synth, tmp_path / "run", tracking, **settings)
    assert {f"train/{term}" for term in terms} <= set(trained["history"])
    assert trained["results"]["steps"] == steps_per_epoch(32, workers=2)
    model = trained["model"]
    if settings.get("fds"):  # one epoch of statistics, all-reduced: the running means moved off 0
        assert model["feature_smoothing.epochs_done"].item() == 1
        assert model["feature_smoothing.running_mean"].abs().sum() > 0
    if settings["method"] == "balanced_mse":  # sigma trained (and logged) as a parameter
        sigma = model["method_state.sigma"].item()
        assert sigma != 3.0 and trained["history"]["train/noise_sigma"] == pytest.approx(3.0, abs=0.5)


def test_rnc_pretraining_then_a_linear_probe_on_its_frozen_encoder(tiny_synth, tmp_path, tracking):
    pretrained = run(tiny_synth, tmp_path / "rnc", tracking, method="rnc")
    assert "train/rnc" in pretrained["history"] and pretrained["results"]["best_epoch"] == 1
    rnc_encoder = {k: v for k, v in pretrained["model"].items() if k.startswith("encoder.")}
    source = str(tmp_path / "rnc" / "checkpoint.pt")

    probe = run(tiny_synth, tmp_path / "probe", tracking, method="vanilla", init_from=source, freeze_encoder=True,
                lr=0.05, optimizer="sgd")
    # A frozen encoder: its weights and BatchNorm statistics are the pretrained ones, bit for bit.
    assert all(torch.equal(probe["model"][key], value) for key, value in rnc_encoder.items())
    assert not torch.equal(probe["model"]["experts.weight"], pretrained["model"]["experts.weight"])
    # Two-stage Group-DIR fine-tunes from such an encoder: tests/test_bench.py (its RnC-pretrained runs).
