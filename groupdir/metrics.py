"""Shot metrics as the DIR field computes them.

Test labels are binned (width 1 for ages); a bin's shot comes from its TRAINING count: many-shot
with more than `many` samples, few-shot with fewer than `few`, median-shot otherwise. GM is the
geometric mean of |error| with errors clamped at 1e-8, so a single exact prediction does not zero
it. bMAE is the mean over test bins of the per-bin MAE. An empty shot gives NaN.
"""

from __future__ import annotations

import math

import numpy as np

from groupdir.labels import FEW_SHOT, MANY_SHOT, SHOTS, label_bins, shot_of_bins

GM_EPSILON = 1e-8


def shot_metrics(pred, target, train_labels, many: int = MANY_SHOT, few: int = FEW_SHOT,
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
        result[f"n/{shot}"] = int(mask.sum())
        result.update({f"{name}/{shot}": value for name, value in error_metrics(errors[mask], bins[mask]).items()})
    return result


def error_metrics(errors: np.ndarray, bins: np.ndarray) -> dict[str, float]:
    """MAE, MSE, GM and bMAE of absolute errors whose labels fall in `bins`; NaN when empty."""
    if errors.size == 0:
        return {name: math.nan for name in ("mae", "mse", "gm", "bmae")}
    _, inverse = np.unique(bins, return_inverse=True)
    return {"mae": float(errors.mean()), "mse": float((errors ** 2).mean()),
            "gm": float(np.exp(np.log(np.maximum(errors, GM_EPSILON)).mean())),
            "bmae": float((np.bincount(inverse, weights=errors) / np.bincount(inverse)).mean())}


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


ROUTE_NOTES = {"predicted": "argmax group (the paper)", "soft": "sum_g p(g|x) expert_g",
               "adjusted": "argmax of logit-adjusted groups", "adjusted_soft": "soft mix of the adjusted posterior",
               "oracle": "true group picks the expert; not a test result",
               "centroid": "true group's mean training label; not a test result"}


def format_shot_table(runs: dict[str, dict]) -> str:
    """Side-by-side shot tables, one block of columns per run (name -> results of a split), each of
    the route its validation selected; then every route of each run on a line of its own."""
    names = list(runs)
    width = 38
    lines = ["".ljust(8) + "".join(f"{name + ' (' + runs[name]['selected_route'] + ' route)':^{width}}"
                                   for name in names),
             f"{'shot':<8}" + f"{'n':>6}{'MAE':>8}{'MSE':>9}{'GM':>7}{'bMAE':>7}".ljust(width) * len(names)]
    for shot in SHOTS:
        cells = []
        for name in names:
            r = runs[name][runs[name]["selected_route"]]
            cells.append(f"{r[f'n/{shot}']:>6d}{r[f'mae/{shot}']:>8.2f}{r[f'mse/{shot}']:>9.1f}"
                         f"{r[f'gm/{shot}']:>7.2f}{r[f'bmae/{shot}']:>7.2f}".ljust(width))
        lines.append(f"{shot:<8}" + "".join(cells))
    lines.append(f"{'groups':<8}" + "".join(
        f"acc {selected(runs[n])['group_acc']:.2f} (few {selected(runs[n]).get('group_acc/few', math.nan):.2f})"
        f"  |err| {selected(runs[n])['group_dist']:.2f}".ljust(width) for n in names))
    for name in names:
        routes = [route for route in ROUTE_NOTES if route in runs[name]]
        if len(routes) < 2:
            continue
        calibration = runs[name]["calibration"]
        lines += ["", f"{name}, every route (MAE all / many / median / few, bMAE, group acc few, |group err|):"]
        for route in routes:
            r = runs[name][route]
            setting = {"adjusted": f" tau {calibration['tau']:g}",
                       "adjusted_soft": f" tau {calibration['soft_tau']:g} T {calibration['route_temperature']:g}"}
            label = route + setting.get(route, "") + (" *" if route == runs[name]["selected_route"] else "")
            lines.append(f"  {label:<28}" + "".join(f"{r[f'mae/{shot}']:7.2f}" for shot in SHOTS)
                         + f"{r['bmae/all']:7.2f}{r.get('group_acc/few', math.nan):7.2f}{r['group_dist']:7.2f}"
                         + f"   {ROUTE_NOTES[route]}")
    lines.append("* the route validation selected. GM: geometric mean of |error|, errors clamped at 1e-8. "
                 "bMAE: mean over labels of per-label MAE.")
    return "\n".join(lines)


def selected(results: dict) -> dict:
    """The metrics of the route validation selected."""
    return results[results["selected_route"]]


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)
