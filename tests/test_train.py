import json

import numpy as np
import pytest
import torch

from groupdir.config import load_config
from groupdir.train import TrainingError, check_finite, evaluate_checkpoint, train


@pytest.mark.parametrize("method", ["groupdir", "vanilla"])
def test_tiny_run_learns(tiny_synth, tmp_path, method):
    cfg = load_config(overrides={"data": str(tiny_synth), "method": method, "epochs": 6, "batch_size": 64,
                                 "image_size": 32, "num_groups": 5, "lr": 2e-3, "seed": 0})
    results = train(cfg, tmp_path, progress=False)

    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 6 * (600 // 64)
    expected_terms = {"total", "reg", "cls", "grc"} if method == "groupdir" else {"total", "reg"}
    assert expected_terms <= set(steps[0])
    first, last = np.mean([s["total"] for s in steps[:9]]), np.mean([s["total"] for s in steps[-9:]])
    assert last < first, "training loss did not fall"

    # Validation MAE of the best checkpoint beats predicting the training mean for every sample.
    history = json.loads((tmp_path / "history.json").read_text())
    best_val = min(h["val/mae/all"] for h in history)
    # The checkpoint is chosen on VALIDATION (select_metric), never on test.
    val_metric = [h["val/bmae/all"] for h in history]
    assert results["best_epoch"] == int(np.argmin(val_metric)) + 1
    from groupdir.data import read_dir_table
    table = read_dir_table(tiny_synth)
    mean_baseline = np.abs(table.labels["val"] - table.labels["train"].mean()).mean()
    assert best_val < mean_baseline

    saved = json.loads((tmp_path / "results.json").read_text())
    routes = {"predicted", "soft", "oracle"} if method == "groupdir" else {"predicted"}
    assert routes <= set(saved) and {"mae/few", "bmae/all", "group_acc"} <= set(saved["predicted"])
    if method == "groupdir":
        assert saved["oracle"]["group_acc"] == 1.0
    # `groupdir eval` on the saved checkpoint reproduces the test metrics.
    again = evaluate_checkpoint(tmp_path / "checkpoint.pt", str(tiny_synth), "test", device="cpu")
    assert again["predicted"]["mae/all"] == pytest.approx(results["predicted"]["mae/all"], rel=1e-5)


def test_non_finite_loss_names_the_term_and_step():
    with pytest.raises(TrainingError, match="loss term 'grc' is nan at epoch 2, step 17"):
        check_finite({"total": torch.tensor(1.0), "grc": torch.tensor(float("nan"))}, epoch=1, step=17)
