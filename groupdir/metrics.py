"""Shot metrics as the DIR field computes them.

Test labels are binned (width 1 for ages); a bin's shot comes from its TRAINING count: many-shot
with more than `many` samples, few-shot with fewer than `few`, median-shot otherwise. GM is the
geometric mean of |error| with errors clamped at 1e-8, so a single exact prediction does not zero
it. bMAE is the mean over test bins of the per-bin MAE. An empty shot gives NaN.
"""

from __future__ import annotations

import math

import numpy as np

from groupdir.config import SHOTS
from groupdir.losses.regression import label_bins

GM_EPSILON = 1e-8


def shot_of_bins(bins: np.ndarray, train_labels, many: int = 100, few: int = 20,
                 bin_width: float = 1.0) -> np.ndarray:
    """'many' | 'median' | 'few' for each bin, from the training count of that bin."""
    train_bins, train_counts = np.unique(label_bins(train_labels, bin_width), return_counts=True)
    index = np.searchsorted(train_bins, bins)
    found = (index < len(train_bins)) & (train_bins[np.minimum(index, len(train_bins) - 1)] == bins)
    counts = np.where(found, train_counts[np.minimum(index, len(train_bins) - 1)], 0)
    return np.where(counts > many, "many", np.where(counts < few, "few", "median"))


def shot_metrics(pred, target, train_labels, many: int = 100, few: int = 20,
                 bin_width: float = 1.0) -> dict[str, float]:
    pred = _numpy(pred)
    target = _numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    errors = np.abs(pred - target)
    bins = label_bins(target, bin_width)
    shots = shot_of_bins(bins, _numpy(train_labels), many, few, bin_width)
    result = {}
    for shot in SHOTS:
        mask = np.ones_like(errors, dtype=bool) if shot == "all" else shots == shot
        err = errors[mask]
        result[f"n/{shot}"] = int(err.size)
        if err.size == 0:
            result.update({f"{m}/{shot}": math.nan for m in ("mae", "mse", "gm", "bmae")})
            continue
        result[f"mae/{shot}"] = float(err.mean())
        result[f"mse/{shot}"] = float((err ** 2).mean())
        result[f"gm/{shot}"] = float(np.exp(np.log(np.maximum(err, GM_EPSILON)).mean()))
        shot_bins, inverse = np.unique(bins[mask], return_inverse=True)
        per_bin = np.bincount(inverse, weights=err) / np.bincount(inverse)
        result[f"bmae/{shot}"] = float(per_bin.mean())
    return result


def group_metrics(pred_groups, true_groups, shots: np.ndarray | None = None) -> dict[str, float]:
    """Group accuracy and mean |predicted group - true group|, overall and, given each sample's
    shot, per shot ("group_acc/few" ...): where the classifier fails matters as much as how often."""
    pred_groups = _numpy(pred_groups).astype(np.int64)
    true_groups = _numpy(true_groups).astype(np.int64)
    result = {"group_acc": float((pred_groups == true_groups).mean()),
              "group_dist": float(np.abs(pred_groups - true_groups).mean())}
    for shot in SHOTS[1:] if shots is not None else ():
        mask = shots == shot
        result[f"group_acc/{shot}"] = float((pred_groups[mask] == true_groups[mask]).mean()) if mask.any() else math.nan
    return result


def format_shot_table(runs: dict[str, dict]) -> str:
    """Side-by-side shot tables, one block of columns per run (name -> results of `evaluate`).

    Rows all/many/median/few, columns n, MAE, MSE, GM, bMAE of the PREDICTED route; then group
    accuracy, and the soft and oracle routes on lines of their own, labelled apart.
    """
    names = list(runs)
    width = 36
    lines = ["".ljust(8) + "".join(f"{name + ' (predicted route)':^{width}}" for name in names),
             f"{'shot':<8}" + f"{'n':>6}{'MAE':>8}{'MSE':>9}{'GM':>7}{'bMAE':>6}".ljust(width) * len(names)]
    for shot in SHOTS:
        cells = []
        for name in names:
            r = runs[name]["predicted"]
            cells.append(f"{r[f'n/{shot}']:>6d}{r[f'mae/{shot}']:>8.2f}{r[f'mse/{shot}']:>9.1f}"
                         f"{r[f'gm/{shot}']:>7.2f}{r[f'bmae/{shot}']:>6.2f}".ljust(width))
        lines.append(f"{shot:<8}" + "".join(cells))
    lines.append(f"{'groups':<8}" + "".join(
        f"acc {runs[n]['predicted']['group_acc']:.2f} (few {runs[n]['predicted'].get('group_acc/few', math.nan):.2f})"
        f"  |err| {runs[n]['predicted']['group_dist']:.2f}".ljust(width) for n in names))
    for name in names:
        for extra in ("soft", "oracle"):
            if extra in runs[name]:
                r = runs[name][extra]
                lines.append(f"{name}, {extra} route{' (true group, not a test result)' if extra == 'oracle' else ''}: "
                             + "  ".join(f"MAE {shot} {r[f'mae/{shot}']:.2f}" for shot in SHOTS))
    lines.append("GM: geometric mean of |error|, errors clamped at 1e-8. bMAE: mean over labels of per-label MAE.")
    return "\n".join(lines)


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)
