"""`groupdir demo`: the main job on the embedded default. Synthetic faces -> FFCV shards -> Group-DIR
(the packaged `demo` config: `calibrated` at the demo's scale) and vanilla at the same scale, on one
local Ray -> `groupdir eval` of both checkpoints -> their shot tables, and both runs in MLflow."""

from __future__ import annotations

from pathlib import Path

from groupdir.config import load_config
from groupdir.progress import Mode


def run_demo(out: Path, train_size: int = 4000, epochs: int | None = None, workers: int | None = None,
             tracking_uri: str = "", progress: Mode = "off") -> dict:
    """Returns both runs' test results (`groupdir eval`'s), by method. `progress` shows the data's
    writing and encoding and the evaluation, and (unless off) each run's line per epoch."""
    import time

    from groupdir.data import synthetic_shards
    from groupdir.driver import ray_session, train
    from groupdir.evaluation import evaluate_checkpoint
    from groupdir.metrics import format_shot_table
    from groupdir.tracking import resolve_uri, ui_hint

    demo = load_config("demo")
    epochs, workers = epochs or demo.epochs, workers or demo.workers
    clock = time.perf_counter()
    seconds = {}

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase], clock = time.perf_counter() - clock, time.perf_counter()

    shards = synthetic_shards(out, train_size, progress=progress)
    lap("data")
    scale = {"data": str(shards), "epochs": epochs, "workers": workers, "experiment": demo.experiment,
             "tracking_uri": resolve_uri(tracking_uri)}
    trained = {}
    with ray_session(num_cpus=workers):  # one local Ray for both runs
        lap("ray")
        for method, config in (("groupdir", "demo"), ("vanilla", None)):
            print(f"\n== training {method}{f' (--config {config})' if config else ''}: {epochs} epochs on "
                  f"{workers} Ray workers ==", flush=True)
            cfg = load_config(config, {**scale, "method": method})
            # the demo's own run folders are scratch
            trained[method] = train(cfg, out / method, progress=progress, force=True)
            lap(method)
    print("\n== groupdir eval: both checkpoints on the test split ==", flush=True)
    runs = {method: evaluate_checkpoint(out / method / "checkpoint.pt", str(shards), "test", progress=progress)
            for method in ("groupdir", "vanilla")}
    lap("eval")
    print(f"Test split, balanced over ages; shots by training count (many > {cfg.many_shot}, few < {cfg.few_shot}):")
    print(format_shot_table(runs))
    print("\n" + closing_sentence(runs))
    print(f"\nCompare the two runs (experiment '{demo.experiment}') in the MLflow UI:\n"
          + ui_hint(cfg.tracking_uri, demo.experiment))
    print("\n" + phase_table(seconds, {method: results["timings"] for method, results in trained.items()}))
    return runs


def phase_table(seconds: dict[str, float], timings: dict[str, dict[str, float]]) -> str:
    """Where the demo's time went: its own steps, and inside each training run rank 0's phases (the
    rest of a run's wall time is Ray Train starting and stopping its workers, and MLflow's final logging)."""
    from groupdir.tables import markdown_table

    methods = list(timings)
    phases = list(dict.fromkeys(phase for run in timings.values() for phase in run))
    rows = [["synthetic data and FFCV shards", f"{seconds['data']:.0f}", ""],
            ["Ray start-up", f"{seconds['ray']:.0f}", ""]]
    for method in methods:
        inside = sum(timings[method].values())
        rows.append([f"train {method}", f"{seconds[method]:.0f}", ""])
        rows += [[f"  {phase.replace('_', ' ')}", "", f"{timings[method].get(phase, 0.0):.0f}"] for phase in phases]
        rows.append(["  Ray Train workers start / stop, final logging", "", f"{seconds[method] - inside:.0f}"])
    rows.append(["groupdir eval of both checkpoints", f"{seconds['eval']:.0f}", ""])
    rows.append(["total", f"{sum(seconds.values()):.0f}", ""])
    return "\n".join(["Where the time went (seconds):", "",
                      *markdown_table(["phase", "demo step", "inside the run"], rows, text_columns=1)])


def closing_sentence(runs: dict) -> str:
    from groupdir.metrics import selected

    ours, theirs = selected(runs["groupdir"]), selected(runs["vanilla"])
    many = (f"; frequent (many-shot) ages: {ours['mae/many']:.2f} vs {theirs['mae/many']:.2f}" if ours["n/many"]
            else " (a training set this small has no many-shot age)")
    return (f"Validation selected Group-DIR's {runs['groupdir']['selected_route']} route. On the test split, rare "
            f"(few-shot) ages: MAE {ours['mae/few']:.2f} for Group-DIR, {theirs['mae/few']:.2f} for vanilla; "
            f"balanced MAE {ours['bmae/all']:.2f} vs {theirs['bmae/all']:.2f}{many}. One short CPU run of each; "
            f"docs/results.md compares them over paired seeds.")
