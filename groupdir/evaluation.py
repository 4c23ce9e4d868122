"""Predictions over a split, the routes that turn them into values, and their calibration.

`predict` runs the model over a split once and keeps each sample's group logits and every expert's
value. Every route is a function of those arrays, so a route's parameters are chosen on validation
without a second pass over the images:

  predicted      the expert of the argmax group (the paper's test-time rule)
  soft           sum_g p(g|x) * expert_g (paper Lemma 1)
  adjusted       the expert of argmax_g (logit_g + tau * shift_g)
  adjusted_soft  sum_g softmax((logits + tau * shift) / T)_g * expert_g
  oracle         the expert of the TRUE group: not a test result
  centroid       the true group's mean training label, ignoring the image: not a test result; it
                 says how much of the oracle's score the experts themselves earn

shift_g = log pi_target(g) - log pi_head(g) is post-hoc logit adjustment for label shift (Menon et
al., ICLR 2021). pi_head is the group prior the classifier's training targets carry: the training
group frequencies for plain CE, spread by the soft labels for the soft loss, uniform after a
balanced loss (or a classifier re-trained with one). pi_target is the validation split's
group histogram (`la_target=val`) or uniform. tau (a grid over [0, 3]) and T are chosen on the
validation `select_metric`, and so is the headline route when `select_route=auto`; the test split
only ever sees the chosen values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from groupdir import __version__
from groupdir.config import ROUTES, Config
from groupdir.distributed import gather_rows
from groupdir.errors import CheckpointError
from groupdir.grouping import Grouping
from groupdir.labels import label_bins, shot_of_bins
from groupdir.losses import soft_group_labels
from groupdir.metrics import error_metrics, group_metrics, shot_metrics
from groupdir.model import DIRNet
from groupdir.progress import Mode, Progress

TEST_ROUTES = ROUTES                     # selectable: they read no label
REFERENCE_ROUTES = ("oracle", "centroid")  # they read the true group: never a test result
TAU_GRID = tuple(np.round(np.linspace(0.0, 3.0, 31), 2))
ROUTE_TEMPERATURE_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


@dataclass
class Outputs:
    """Per-sample model outputs over one split, every row once, in row order."""
    target: np.ndarray           # (N,) labels
    experts: np.ndarray          # (N, G) each expert's value; (N, 1) for vanilla
    logits: np.ndarray | None    # (N, G) group logits; None for vanilla
    features: np.ndarray | None = None  # (N, D) encoder features, when asked for


@dataclass(frozen=True)
class Calibration:
    """What validation chose; stored in the checkpoint and results.json, applied unchanged to test."""
    shift: tuple[float, ...] = ()    # log pi_target - log pi_head, per group
    tau: float = 0.0                 # adjusted route
    soft_tau: float = 0.0            # adjusted_soft route
    route_temperature: float = 1.0   # adjusted_soft route
    selected_route: str = "predicted"

    def to_dict(self) -> dict:
        """Plain JSON types (a list for the shift), so a dict read back from results.json compares equal."""
        return {**dataclasses.asdict(self), "shift": list(self.shift)}

    @classmethod
    def from_dict(cls, values: dict) -> "Calibration":
        return cls(**{**values, "shift": tuple(values["shift"])})


@torch.no_grad()
def predict(net, loader, device: torch.device, features: bool = False, root_only: bool = False,
            progress: Mode = "off") -> Outputs | None:
    """The model over a whole split, in evaluation mode: each worker predicts its slice, the slices
    are gathered, every row once (on rank 0 alone with `root_only`: None elsewhere). `progress`
    shows the batches predicted (`groupdir eval`; training workers leave it off)."""
    from groupdir.model import forward

    net.eval()
    pieces: dict[str, list] = {"target": [], "experts": [], "logits": [], "features": [], "rows": []}
    with Progress(len(loader), "batches predicted", progress) as predicted:
        for images, labels, rows in loader:
            output = forward(net, images, device)
            pieces["experts"].append(output.experts.float().cpu().numpy())
            if output.group_logits is not None:
                pieces["logits"].append(output.group_logits.float().cpu().numpy())
            if features:
                pieces["features"].append(output.features.float().cpu().numpy())
            pieces["target"].append(labels.numpy())
            pieces["rows"].append(np.asarray(rows))
            predicted.update()
    arrays = {name: np.concatenate(values) for name, values in pieces.items() if values and name != "rows"}
    arrays = gather_rows(arrays, np.concatenate(pieces["rows"]), root_only)
    if arrays is None:
        return None
    return Outputs(arrays["target"], arrays["experts"], arrays.get("logits"), arrays.get("features"))


# ========================================= routes ==========================================

def route(outputs: Outputs, name: str, grouping: Grouping, calibration: Calibration,
          centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, group it stands for) per sample. For the soft routes the group is the one the value
    falls into; for the hard routes the group that picked the expert."""
    if outputs.logits is None:  # vanilla: one regressor
        value = outputs.experts[:, 0]
        return value, grouping.assign(value)
    if name in ("oracle", "centroid"):
        chosen = grouping.assign(outputs.target)
        return (pick(outputs.experts, chosen) if name == "oracle" else centroids[chosen]), chosen
    shift = np.asarray(calibration.shift)
    if name == "predicted":
        chosen = outputs.logits.argmax(axis=1)
    elif name == "adjusted":
        chosen = (outputs.logits + calibration.tau * shift).argmax(axis=1)
    elif name == "soft":
        value = mixture(outputs.logits, outputs.experts)
        return value, grouping.assign(value)
    elif name == "adjusted_soft":
        value = mixture((outputs.logits + calibration.soft_tau * shift) / calibration.route_temperature,
                        outputs.experts)
        return value, grouping.assign(value)
    else:
        raise ValueError(f"unknown route {name!r}: use one of {', '.join(TEST_ROUTES + REFERENCE_ROUTES)}")
    return pick(outputs.experts, chosen), chosen


def pick(experts: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    return np.take_along_axis(experts, chosen[:, None], axis=1)[:, 0]


def mixture(logits: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """sum_g softmax(logits)_g * expert_g, in float64."""
    logits = logits.astype(np.float64)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (weights * experts).sum(axis=1) / weights.sum(axis=1)


def routes_of(cfg: Config) -> tuple[str, ...]:
    from groupdir.methods import get_method

    return TEST_ROUTES + REFERENCE_ROUTES if get_method(cfg.method).grouped else ("predicted",)


# ======================================== priors ===========================================

def group_counts(labels, grouping: Grouping) -> np.ndarray:
    """Samples per group; an empty group counts as one, so that its log-prior stays finite."""
    counts = np.bincount(grouping.assign(labels), minlength=grouping.num_groups).astype(np.float64)
    return np.maximum(counts, 1.0)


def label_prior(train_labels, grouping: Grouping, cfg: Config) -> np.ndarray:
    """The group prior of the classifier's training targets: the training group frequencies, spread
    over neighbouring groups by the soft labels for the soft losses. The balanced losses add its log
    to the logits; logit adjustment divides it out."""
    counts = group_counts(train_labels, grouping)
    if cfg.group_loss.startswith("soft"):
        groups = torch.arange(grouping.num_groups)
        counts = (torch.as_tensor(counts) @ soft_group_labels(groups, grouping.num_groups, cfg.beta).double()).numpy()
    return counts / counts.sum()


def head_prior(train_labels, grouping: Grouping, cfg: Config, retrained: bool = False) -> np.ndarray:
    """The group prior the classifier's logits carry: that of its training targets, or none (uniform)
    after a balanced loss, or after re-training with one (`retrained`)."""
    if retrained or cfg.group_loss.endswith("_balanced"):
        return np.full(grouping.num_groups, 1.0 / grouping.num_groups)
    return label_prior(train_labels, grouping, cfg)


def target_prior(val_labels, grouping: Grouping, la_target: str) -> np.ndarray:
    if la_target == "uniform":
        return np.full(grouping.num_groups, 1.0 / grouping.num_groups)
    counts = group_counts(val_labels, grouping)
    return counts / counts.sum()


def group_centroids(train_labels, grouping: Grouping) -> np.ndarray:
    """Each group's mean training label (the middle of its range when it has none)."""
    labels = np.asarray(train_labels, dtype=np.float64)
    groups = grouping.assign(labels)
    centres = np.empty(grouping.num_groups)
    for g in range(grouping.num_groups):
        members = labels[groups == g]
        low, high = grouping.edges[g], grouping.edges[g + 1]
        centres[g] = members.mean() if len(members) else (low + high) / 2
    return centres


# ====================================== calibration ========================================

def calibrate(val: Outputs, grouping: Grouping, train_labels, cfg: Config, retrained: bool = False) -> Calibration:
    """tau, the adjusted_soft pair (tau, T) and, for select_route=auto, the headline route, each the
    lowest validation `select_metric` (ties go to the smaller tau and to T = 1). `retrained`: the
    classifier was re-trained with a balanced loss (crt.py)."""
    if val.logits is None:
        return Calibration()
    shift = (np.log(target_prior(val.target, grouping, cfg.la_target))
             - np.log(head_prior(train_labels, grouping, cfg, retrained)))
    score = validation_score(val, grouping, train_labels, cfg)
    base = Calibration(shift=tuple(float(s) for s in shift))
    tau = min(TAU_GRID, key=lambda t: score("adjusted", dataclasses.replace(base, tau=t)))
    temperatures = sorted(ROUTE_TEMPERATURE_GRID, key=lambda t: abs(math.log(t)))  # T = 1 first
    soft_tau, temperature = min(((t, T) for t in TAU_GRID for T in temperatures),
                                key=lambda pair: score("adjusted_soft", dataclasses.replace(
                                    base, soft_tau=pair[0], route_temperature=pair[1])))
    calibration = dataclasses.replace(base, tau=float(tau), soft_tau=float(soft_tau),
                                      route_temperature=float(temperature))
    selected = cfg.select_route
    if selected == "auto":
        selected = min(TEST_ROUTES, key=lambda name: score(name, calibration))
    return dataclasses.replace(calibration, selected_route=selected)


def validation_score(val: Outputs, grouping: Grouping, train_labels, cfg: Config):
    """score(route, calibration) -> the validation select_metric of that route (lower is better)."""
    centroids = group_centroids(train_labels, grouping)
    metric, shot = cfg.select_metric.split("/")
    bins = label_bins(val.target, cfg.label_bin_width)
    shots = shot_of_bins(bins, train_labels, cfg.many_shot, cfg.few_shot, cfg.label_bin_width)
    mask = np.ones(len(bins), dtype=bool) if shot == "all" else shots == shot

    def score(name: str, calibration: Calibration) -> float:
        value, _ = route(val, name, grouping, calibration, centroids)
        return error_metrics(np.abs(value - val.target)[mask], bins[mask])[metric]

    return score


# ======================================== metrics ==========================================

def route_metrics(outputs: Outputs, grouping: Grouping, train_labels, cfg: Config,
                  calibration: Calibration) -> dict:
    """Shot and group metrics of every route, the selected route's name and the calibration: what
    results.json holds for a split."""
    centroids = group_centroids(train_labels, grouping)
    true_groups = grouping.assign(outputs.target)
    shots = shot_of_bins(label_bins(outputs.target, cfg.label_bin_width), train_labels, cfg.many_shot,
                         cfg.few_shot, cfg.label_bin_width)
    results: dict = {}
    for name in routes_of(cfg):
        value, groups = route(outputs, name, grouping, calibration, centroids)
        results[name] = {**shot_metrics(value, outputs.target, train_labels, cfg.many_shot, cfg.few_shot,
                                        cfg.label_bin_width),
                         **group_metrics(groups, true_groups, shots)}
    results["selected_route"] = calibration.selected_route
    results["calibration"] = calibration.to_dict()
    return results


def route_values(outputs: Outputs, grouping: Grouping, train_labels, calibration: Calibration) -> dict:
    """Each test route's per-sample values (for plots)."""
    centroids = group_centroids(train_labels, grouping)
    names = TEST_ROUTES if outputs.logits is not None else ("predicted",)
    return {name: route(outputs, name, grouping, calibration, centroids) for name in names}


# ================================== a saved checkpoint =====================================

def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[DIRNet, dict]:
    """The model of a run folder's checkpoint.pt, in evaluation mode, and the checkpoint itself (its
    config, group edges, training labels and the calibration validation chose)."""
    from groupdir import checkpoint
    from groupdir.config import build
    from groupdir.methods import build_model

    saved = checkpoint.load(path)
    if "calibration" not in saved:
        raise CheckpointError(f"checkpoint {path} has no route calibration (it predates groupdir "
                              f"{__version__}); train it again")
    cfg = build(saved["config"])
    model = build_model(cfg, saved["train_labels"].numpy())
    checkpoint.load_weights(model, saved["model"], path, f"{cfg.method} model")
    return model.to(device).eval(), saved


def evaluate_checkpoint(path: str | Path, data: str, split: str = "test", batch_size: int | None = None,
                        device: str | None = None, shots: tuple[int, int] | None = None,
                        progress: Mode = "off") -> dict:
    """`groupdir eval`: the checkpoint's model on a split of a data root, every route, with the
    calibration chosen on validation when it was trained; one process. `shots`: other (many, few)
    thresholds of the shot metrics than the run's. `progress` shows the batches predicted. Data whose
    labels do not fit the checkpoint's range is refused before the model sees it (checkpoint.check_labels_fit)."""
    from groupdir import checkpoint
    from groupdir.config import build
    from groupdir.data import open_data, split_labels

    target_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, saved = load_model(path, target_device)
    cfg = build({**saved["config"], "data": str(data), **({"batch_size": batch_size} if batch_size else {}),
                 **({"many_shot": shots[0], "few_shot": shots[1]} if shots else {})})
    checkpoint.check_labels_fit(path, saved, split_labels(cfg, split), f"the {split} split of {data}")
    loader = open_data(cfg, [split], augmented=None, device=target_device)[1][split]
    outputs = predict(model, loader, target_device, progress=progress)
    return route_metrics(outputs, Grouping(tuple(saved["group_edges"])), saved["train_labels"].numpy(), cfg,
                         Calibration.from_dict(saved["calibration"]))
