"""Routes, logit adjustment and its calibration on validation, on hand-made outputs; `groupdir
eval`'s refusal of data that does not fit a checkpoint."""

import dataclasses

import numpy as np
import pytest
import torch

from groupdir.checkpoint import check_labels_fit
from groupdir.config import load_config
from groupdir.data import read_dir_table
from groupdir.errors import CheckpointError
from groupdir.evaluation import (Calibration, Outputs, calibrate, evaluate_checkpoint, group_centroids, head_prior,
                                 label_prior, predict, route, route_metrics, target_prior)
from groupdir.grouping import make_grouping
from helpers import saved_checkpoint

GROUPING = make_grouping(np.arange(0, 30), 3, "equal_width", (0, 30))  # groups [0,10) [10,20) [20,30)
EXPERTS = np.array([[5.0, 15.0, 25.0], [6.0, 16.0, 26.0]])
CENTROIDS = np.array([5.0, 15.0, 25.0])


def test_routes_pick_the_right_expert():
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    outputs = Outputs(target=np.array([12.0, 13.0]), experts=EXPERTS, logits=logits)
    plain = Calibration(shift=(0.0, 0.0, 0.0))
    assert route(outputs, "predicted", GROUPING, plain, CENTROIDS)[0].tolist() == [5.0, 26.0]
    assert route(outputs, "oracle", GROUPING, plain, CENTROIDS)[0].tolist() == [15.0, 16.0]  # true group 1
    assert route(outputs, "centroid", GROUPING, plain, CENTROIDS)[0].tolist() == [15.0, 15.0]
    probs = torch.tensor(logits).softmax(1).numpy()
    np.testing.assert_allclose(route(outputs, "soft", GROUPING, plain, CENTROIDS)[0], (probs * EXPERTS).sum(1))
    with pytest.raises(ValueError, match="unknown route"):
        route(outputs, "best", GROUPING, plain, CENTROIDS)


def test_tau_zero_is_the_plain_route():
    rng = np.random.default_rng(0)
    outputs = Outputs(rng.uniform(0, 30, 50), rng.normal(15, 8, (50, 3)), rng.normal(0, 2, (50, 3)))
    shift = (1.5, -2.0, 3.0)
    zero = Calibration(shift=shift, tau=0.0, soft_tau=0.0, route_temperature=1.0)
    np.testing.assert_array_equal(route(outputs, "adjusted", GROUPING, zero, CENTROIDS)[0],
                                  route(outputs, "predicted", GROUPING, zero, CENTROIDS)[0])
    np.testing.assert_allclose(route(outputs, "adjusted_soft", GROUPING, zero, CENTROIDS)[0],
                               route(outputs, "soft", GROUPING, zero, CENTROIDS)[0])
    moved = dataclasses.replace(zero, tau=1.0)
    assert not np.array_equal(route(outputs, "adjusted", GROUPING, moved, CENTROIDS)[0],
                              route(outputs, "predicted", GROUPING, zero, CENTROIDS)[0])


def test_adjustment_moves_the_argmax_toward_the_rarer_group():
    # Group 0 held 90% of the training samples; the target prior is uniform. A sample the head
    # finds slightly more likely to be in group 0 goes to group 1 once the prior is divided out.
    cfg = load_config(overrides={"group_loss": "ce", "la_target": "uniform"})
    train_labels = np.r_[np.full(90, 5.0), np.full(5, 15.0), np.full(5, 25.0)]
    shift = np.log(target_prior(np.arange(30.0), GROUPING, cfg.la_target)) - np.log(
        head_prior(train_labels, GROUPING, cfg))
    np.testing.assert_allclose(shift, np.log(1 / 3) - np.log([0.9, 0.05, 0.05]))
    outputs = Outputs(np.array([15.0]), EXPERTS[:1], np.array([[1.0, 0.5, -3.0]]))
    calibration = Calibration(shift=tuple(shift), tau=1.0)
    value, chosen = route(outputs, "adjusted", GROUPING, calibration, CENTROIDS)
    assert route(outputs, "predicted", GROUPING, calibration, CENTROIDS)[1].tolist() == [0]
    assert chosen.tolist() == [1] and value.tolist() == [15.0]


def test_soft_labels_spread_the_training_prior_and_a_balanced_head_has_none():
    train_labels = np.r_[np.full(80, 5.0), np.full(20, 15.0)]  # no sample in group 2
    ce = load_config(overrides={"group_loss": "ce"})
    soft = load_config(overrides={"group_loss": "soft", "beta": 1.0})
    np.testing.assert_allclose(head_prior(train_labels, GROUPING, ce), [80 / 101, 20 / 101, 1 / 101])
    spread = head_prior(train_labels, GROUPING, soft)
    assert spread.sum() == pytest.approx(1.0) and spread[2] > 0.05  # neighbours inherit mass
    np.testing.assert_allclose(spread, label_prior(train_labels, GROUPING, soft))
    np.testing.assert_allclose(head_prior(train_labels, GROUPING, soft, retrained=True), [1 / 3] * 3)
    balanced = load_config(overrides={"group_loss": "soft_balanced"})
    np.testing.assert_allclose(head_prior(train_labels, GROUPING, balanced), [1 / 3] * 3)


def synthetic_split(rng, n: int, bias: float) -> Outputs:
    """Outputs of a head that leans toward group 0 by `bias` nats; experts are exact within groups."""
    target = rng.uniform(0, 30, n)
    true_groups = GROUPING.assign(target)
    logits = 2.0 * np.eye(3)[true_groups] + rng.normal(0, 1.0, (n, 3))
    logits[:, 0] += bias
    experts = np.repeat(target[:, None], 3, axis=1) + (np.arange(3)[None, :] - true_groups[:, None]) * 10.0
    return Outputs(target, experts, logits)


def test_calibration_divides_out_the_training_prior():
    cfg = load_config(overrides={"group_loss": "ce", "la_target": "uniform", "select_route": "auto",
                                 "num_groups": 3})
    rng = np.random.default_rng(0)
    train_labels = np.r_[rng.uniform(0, 10, 800), rng.uniform(10, 30, 200)]
    val = synthetic_split(rng, 600, bias=np.log(8.0))
    calibration = calibrate(val, GROUPING, train_labels, cfg)
    assert 0.5 <= calibration.tau <= 2.0  # the head's prior was divided out (about tau = 1)
    assert calibration.selected_route in ("adjusted", "adjusted_soft")

    test = synthetic_split(rng, 600, bias=np.log(8.0))
    results = route_metrics(test, GROUPING, train_labels, cfg, calibration)
    assert results["adjusted"]["bmae/all"] < results["predicted"]["bmae/all"]
    assert results["selected_route"] == calibration.selected_route
    assert results["oracle"]["group_acc"] == 1.0 and results["oracle"]["mae/all"] == pytest.approx(0.0)
    # That the test split never reaches the calibration is tested end to end in test_train.py.


def test_a_fixed_route_is_kept_and_vanilla_has_only_the_predicted_route():
    rng = np.random.default_rng(1)
    train_labels = rng.uniform(0, 30, 300)
    val = synthetic_split(rng, 200, bias=1.0)
    fixed = load_config(overrides={"select_route": "predicted", "num_groups": 3})
    assert calibrate(val, GROUPING, train_labels, fixed).selected_route == "predicted"
    vanilla = load_config(overrides={"method": "vanilla"})
    outputs = Outputs(val.target, val.experts[:, :1], None)
    calibration = calibrate(outputs, GROUPING, train_labels, vanilla)
    results = route_metrics(outputs, GROUPING, train_labels, vanilla, calibration)
    assert results["selected_route"] == "predicted" and "adjusted" not in results


def test_group_centroids_are_mean_training_labels():
    np.testing.assert_allclose(group_centroids([1.0, 3.0, 12.0], GROUPING), [2.0, 12.0, 25.0])


def test_predict_shows_the_batches_only_when_asked(capsys):
    from groupdir.model import DIRNet

    net = DIRNet("resnet18", num_groups=3)
    loader = [(torch.randn(2, 3, 16, 16), torch.tensor([float(2 * b), 2 * b + 1.0]), [2 * b, 2 * b + 1])
              for b in range(3)]
    outputs = predict(net, loader, torch.device("cpu"), progress="lines")
    assert outputs.experts.shape == (6, 3) and outputs.target.tolist() == [0, 1, 2, 3, 4, 5]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "batches predicted: 0/3" and lines[-1].startswith("batches predicted: 3/3 in ")
    predict(net, loader, torch.device("cpu"))  # as the training workers call it
    assert capsys.readouterr().err == ""


def test_eval_data_may_reach_a_quarter_of_the_label_range_beyond_it():
    saved = {"group_edges": [0.0, 50.0, 100.0]}
    check_labels_fit("run/checkpoint.pt", saved, [-25.0, 50.0, 125.0], "the test split of d")
    for beyond in (-25.5, 125.5):
        with pytest.raises(CheckpointError, match=r"^checkpoint run/checkpoint.pt was trained for labels 0 to 100 "
                           r"\(2 groups\); the test split of d has labels .* more than 25% of that range beyond it"):
            check_labels_fit("run/checkpoint.pt", saved, [50.0, beyond], "the test split of d")


def test_eval_refuses_data_of_another_label_range_and_takes_its_own_test_split(tiny_synth, tmp_path):
    table = read_dir_table(tiny_synth)
    # A balanced test split holds ages the skewed training split lacks at its ends: they are evaluated.
    assert table.labels["test"].min() < table.labels["train"].min() and table.labels["test"].max() > table.labels["train"].max()
    own = saved_checkpoint(tmp_path / "own.pt", table.labels["train"], num_groups=4)
    results = evaluate_checkpoint(own, str(tiny_synth), "test", device="cpu")
    assert results["predicted"]["n/all"] == len(table.labels["test"])

    narrow = saved_checkpoint(tmp_path / "narrow.pt", np.arange(40.0, 61.0), num_groups=4)
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path / 'narrow.pt'} was trained for labels 40 to 60 "
                                              rf"\(4 groups\); the val split of {tiny_synth} has labels 0 to 99, more"):
        evaluate_checkpoint(narrow, str(tiny_synth), "val", device="cpu")
