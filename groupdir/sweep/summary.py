"""The outcome of a sweep: one row per trial from MLflow, the best finished trial on validation,
and the table, CSV and plot on the parent run."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from groupdir.atomic import write_json_atomic
from groupdir.config import parse_value
from groupdir.sweep.space import SweepSpec, short
from groupdir.tables import markdown_table
from groupdir.tracking import Tracker

# ======================================== summary ========================================

def trial_rows(uri: str, parent_id: str, select_metric: str, spec: SweepSpec) -> list[dict]:
    """One row per child run: its status, searched values, best validation metric, test metrics."""
    tracker = Tracker(uri)
    rows = []
    for run in tracker.child_runs(parent_id):
        history = tracker.metric_history(run.info.run_id, f"val/{select_metric}")
        if "stopped_epoch" in run.data.tags:
            history = [m for m in history if m.step <= int(run.data.tags["stopped_epoch"])]
        status = run.info.status
        if status == "KILLED":
            status = "STOPPED_EARLY" if "stopped_early" in run.data.tags else "INTERRUPTED"
        values = [m.value for m in history if math.isfinite(m.value)]
        # A finished run logs its delivered model's validation score (after classifier re-training,
        # which no epoch's report sees); other runs are judged on their best epoch.
        delivered = run.data.metrics.get(f"best_val/{select_metric}") if status == "FINISHED" else None
        rows.append({"trial": run.data.tags.get("trial_id", ""), "run_id": run.info.run_id, "status": status,
                     "params": {p.key: run.data.params[p.key] if p.bundles else parse_value(p.key, run.data.params[p.key])
                                for p in spec.params},
                     "best_val": delivered if delivered is not None else min(values) if values else math.nan,
                     "epochs": len({m.step for m in history}),
                     "test": {k: v for k, v in run.data.metrics.items() if k.startswith("test/")},
                     "best_logged": f"best_val/{select_metric}" in run.data.metrics})
    return rows


def summarize(uri: str, parent_id: str, select_metric: str, spec: SweepSpec, rows: list[dict], sweep_dir: Path) -> dict:
    """The best finished trial (on validation) and every trial, onto the parent run and to disk."""
    from groupdir import plots

    tracker = Tracker(uri)
    metric = f"val/{select_metric}"
    finished = [row for row in rows if row["status"] == "FINISHED" and math.isfinite(row["best_val"])]
    best = min(finished, key=lambda row: row["best_val"]) if finished else None
    for row in rows:
        if math.isfinite(row["best_val"]) and not row["best_logged"]:
            tracker.log_metrics(row["run_id"], {f"best_{metric}": row["best_val"]})
    table = format_trials(rows, spec, select_metric)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("FINISHED", "STOPPED_EARLY", "FAILED")}
    summary = {"sweep": spec.name, "metric": metric, "mlflow_parent_run_id": parent_id, "trials": len(rows),
               **{k.lower(): v for k, v in counts.items()}, "best": best, "rows": rows}
    tracker.log_metrics(parent_id, {f"trials/{k.lower()}": v for k, v in counts.items()})
    if best:
        # Under the trials' own names, so that in MLflow's runs table the parent's row lines up with its
        # trials' columns; the tags say which trial it is.
        tracker.log_params(parent_id, best["params"])
        tracker.log_metrics(parent_id, {f"best_{metric}": best["best_val"], **best["test"]})
        tracker.set_tags(parent_id, {"best_trial": best["trial"], "best_run_id": best["run_id"]})
    tracker.log_text(parent_id, table["markdown"], "trials.md")
    tracker.log_text(parent_id, table["csv"], "trials.csv")
    plotted = [row for row in rows if math.isfinite(row["best_val"])]
    if plotted:
        tracker.log_figure(parent_id, plots.params_vs_metric(plotted, {p.key: p.kind for p in spec.params}, select_metric),
                          "plots/params_vs_metric.png")
    (sweep_dir / "trials.csv").write_text(table["csv"])
    write_json_atomic(sweep_dir / "summary.json", summary)
    tracker.finish_run(parent_id, "FINISHED" if best else "FAILED", error="" if best else "no trial finished")
    return summary


def format_trials(rows: list[dict], spec: SweepSpec, select_metric: str) -> dict[str, str]:
    """The trials, best validation metric first: as Markdown (for people) and CSV (for tools)."""
    keys = [p.key for p in spec.params]
    header = ["trial", "status", *keys, f"best val {select_metric}", "epochs", "test mae/all", "test bmae/all"]
    ordered = sorted(rows, key=lambda row: (row["status"] != "FINISHED", _nan_last(row["best_val"])))
    body = [[row["trial"], row["status"].lower().replace("_", " "), *(short(row["params"][k]) for k in keys),
             f"{row['best_val']:.3f}", str(row["epochs"]),
             *(f"{row['test'][k]:.3f}" if k in row["test"] else "" for k in ("test/mae/all", "test/bmae/all"))]
            for row in ordered]
    markdown = "\n".join(markdown_table(header, body, text_columns=len(header))) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header + ["mlflow_run_id"])
    writer.writerows(line + [row["run_id"]] for line, row in zip(body, ordered))
    return {"markdown": markdown, "csv": buffer.getvalue()}


def _nan_last(value: float) -> float:
    return value if math.isfinite(value) else math.inf
