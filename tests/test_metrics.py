import math

import numpy as np
import pytest

from groupdir.metrics import format_shot_table, group_metrics, shot_metrics

# Training counts: label 1 -> 150 (many), label 2 -> 50 (median), label 3 -> 5 (few).
TRAIN = np.array([1.0] * 150 + [2.0] * 50 + [3.0] * 5)


def test_shot_metrics_by_hand():
    target = np.array([1, 1, 2, 3, 3, 3])
    pred = np.array([2, 1, 4, 3, 1, 6])  # errors 1, 0, 2, 0, 2, 3
    m = shot_metrics(pred, target, TRAIN)
    assert m["mae/all"] == pytest.approx(8 / 6)
    assert m["mse/all"] == pytest.approx((1 + 0 + 4 + 0 + 4 + 9) / 6)
    assert m["mae/many"] == pytest.approx(0.5)
    assert m["mae/median"] == pytest.approx(2)
    assert m["mae/few"] == pytest.approx(5 / 3)
    # bMAE: mean of per-label MAE = (0.5 + 2 + 5/3) / 3
    assert m["bmae/all"] == pytest.approx((0.5 + 2 + 5 / 3) / 3)
    # GM clamps exact predictions at 1e-8 instead of collapsing to 0.
    assert m["gm/many"] == pytest.approx(math.sqrt(1 * 1e-8))
    assert m["n/few"] == 3


def test_zero_errors_and_an_empty_shot():
    target = np.array([1.0, 1.0, 3.0])
    m = shot_metrics(target, target, TRAIN)
    assert m["mae/all"] == 0 and m["mse/all"] == 0
    assert m["gm/all"] == pytest.approx(1e-8)
    assert all(math.isnan(m[f"{k}/median"]) for k in ("mae", "mse", "gm", "bmae"))
    assert m["n/median"] == 0


def test_unseen_test_label_is_few_shot_and_bins_follow_the_width():
    m = shot_metrics([10.0], [9.0], TRAIN)
    assert m["mae/few"] == 1 and m["n/few"] == 1
    # With bin width 0.1, 0.3 and 0.34 share a bin; 0.3 has 150 training samples -> many.
    m = shot_metrics([0.3, 0.5], [0.3, 0.34], np.array([0.3] * 150), bin_width=0.1)
    assert m["n/many"] == 2


def test_shot_thresholds_are_strict():
    train = np.array([1.0] * 100 + [2.0] * 20)
    m = shot_metrics([1, 2], [1, 2], train, many=100, few=20)
    assert m["n/median"] == 2  # exactly 100 is not many, exactly 20 is not few


def test_group_metrics_and_table():
    assert group_metrics([0, 2, 3], [0, 1, 1]) == {"group_acc": pytest.approx(1 / 3), "group_dist": 1.0}
    per_shot = group_metrics([0, 2, 3], [0, 1, 3], shots=np.array(["many", "few", "few"]))
    assert per_shot["group_acc/many"] == 1.0 and per_shot["group_acc/few"] == 0.5
    assert math.isnan(per_shot["group_acc/median"])
    m = shot_metrics([1, 2, 3], [1, 2, 3.5], TRAIN)
    result = {"predicted": {**m, "group_acc": 0.5, "group_dist": 1.0}, "oracle": {**m, "group_acc": 1.0, "group_dist": 0.0},
              "adjusted": {**m, "group_acc": 0.7, "group_dist": 0.5}, "selected_route": "adjusted",
              "calibration": {"shift": [0.0], "tau": 0.8, "soft_tau": 1.0, "route_temperature": 0.5}}
    vanilla = {"predicted": {**m, "group_acc": 0.4, "group_dist": 1.2}, "selected_route": "predicted"}
    table = format_shot_table({"a": result, "b": vanilla})
    assert "a (adjusted route)" in table and "b (predicted route)" in table  # each run's selected route
    assert "acc 0.70" in table and "acc 0.40" in table
    assert "adjusted tau 0.8 *" in table and "true group picks the expert; not a test result" in table
    assert "b, every route" not in table  # one route: nothing to list
