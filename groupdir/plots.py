"""The three figures every run logs: where the errors are, which groups get confused, how predictions
spread. Each takes the test split's arrays and returns a matplotlib Figure (no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from groupdir.labels import label_bins  # noqa: E402


def per_label_error(pred: np.ndarray, target: np.ndarray, train_labels: np.ndarray, bin_width: float):
    """MAE of each test label (bin) against how many training samples that label had."""
    bins = label_bins(target, bin_width)
    labels = np.unique(bins)
    mae = np.array([np.abs(pred[bins == b] - target[bins == b]).mean() for b in labels])
    train_bins, train_counts = np.unique(label_bins(train_labels, bin_width), return_counts=True)
    counts = dict(zip(train_bins.tolist(), train_counts.tolist()))
    figure, error_axis = plt.subplots(figsize=(9, 4))
    count_axis = error_axis.twinx()
    count_axis.bar(labels * bin_width, [counts.get(b, 0) for b in labels.tolist()], width=bin_width,
                   color="lightgray", label="training samples")
    error_axis.plot(labels * bin_width, mae, color="tab:red", marker=".", label="test MAE")
    error_axis.set_zorder(count_axis.get_zorder() + 1)
    error_axis.patch.set_visible(False)
    error_axis.set_xlabel("label")
    error_axis.set_ylabel("test MAE", color="tab:red")
    count_axis.set_ylabel("training samples", color="gray")
    error_axis.set_title("Per-label test MAE against training count")
    figure.tight_layout()
    return figure


def group_confusion(chosen_groups: np.ndarray, true_groups: np.ndarray, num_groups: int):
    """Rows: true group; columns: the group the classifier chose; each row sums to 1."""
    counts = np.zeros((num_groups, num_groups))
    np.add.at(counts, (true_groups.astype(int), chosen_groups.astype(int)), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    image = axis.imshow(rates, cmap="viridis", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, label="fraction of the true group")
    axis.set_xlabel("predicted group")
    axis.set_ylabel("true group")
    axis.set_title("Group confusion (test)")
    figure.tight_layout()
    return figure


def predicted_vs_true(pred: np.ndarray, target: np.ndarray, route: str = "predicted"):
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.scatter(target, pred, s=4, alpha=0.4)
    low, high = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
    axis.plot([low, high], [low, high], color="black", linewidth=1)
    axis.set_xlabel("true label")
    axis.set_ylabel(f"prediction ({route} route)")
    axis.set_title("Predicted vs true (test)")
    figure.tight_layout()
    return figure


def params_vs_metric(rows: list[dict], params: dict[str, str], metric: str):
    """One panel per searched parameter: each trial's best validation `metric` against its value,
    finished trials filled, trials stopped early hollow. `params` maps key -> search kind."""
    figure, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.4), squeeze=False)
    for axis, (key, kind) in zip(axes[0], params.items()):
        values = [row["params"][key] for row in rows]
        categorical = not all(isinstance(value, (int, float)) for value in values)
        positions = {value: i for i, value in enumerate(sorted(set(map(str, values))))} if categorical else {}
        for finished in (True, False):
            chosen = [row for row in rows if (row["status"] == "FINISHED") == finished]
            x = [positions[str(row["params"][key])] if categorical else row["params"][key] for row in chosen]
            axis.scatter(x, [row["best_val"] for row in chosen], s=36, edgecolors="tab:blue",
                         facecolors="tab:blue" if finished else "none",
                         label="finished" if finished else "stopped early")
        if categorical:
            axis.set_xticks(list(positions.values()), list(positions))
        if kind == "loguniform":
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(f"best val {metric}")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Sweep: each trial's best validation {metric} (lower is better)")
    figure.tight_layout()
    return figure
