"""`groupdir demo`: the main job on the embedded default. Synthetic faces -> FFCV shards -> Group-DIR
(the packaged `demo` config: `calibrated` at the demo's scale) and vanilla at the same scale, on one
local Ray -> `groupdir eval` of both checkpoints -> their shot tables, and both runs in MLflow."""

from __future__ import annotations

from pathlib import Path

from groupdir.config import load_config


def run_demo(out: Path, train_size: int = 4000, epochs: int | None = None, workers: int | None = None,
             tracking_uri: str = "") -> dict:
    """Returns both runs' test results (`groupdir eval`'s), by method."""
    import ray

    from groupdir.data import synthetic_shards
    from groupdir.driver import train
    from groupdir.evaluation import evaluate_checkpoint
    from groupdir.metrics import format_shot_table
    from groupdir.tracking import resolve_uri

    demo = load_config("demo")
    epochs, workers = epochs or demo.epochs, workers or demo.workers
    shards = synthetic_shards(out, train_size)
    scale = {"data": str(shards), "epochs": epochs, "workers": workers, "experiment": demo.experiment,
             "tracking_uri": resolve_uri(tracking_uri)}
    ray.init(num_cpus=workers, logging_level="WARNING")  # one local Ray for both runs
    try:
        for method, config in (("groupdir", "demo"), ("vanilla", None)):
            print(f"\n== training {method}{f' (--config {config})' if config else ''}: {epochs} epochs on "
                  f"{workers} Ray workers ==", flush=True)
            cfg = load_config(config, {**scale, "method": method})
            train(cfg, out / method, force=True)  # the demo's own run folders are scratch
    finally:
        ray.shutdown()
    print("\n== groupdir eval: both checkpoints on the test split ==", flush=True)
    runs = {method: evaluate_checkpoint(out / method / "checkpoint.pt", str(shards), "test")
            for method in ("groupdir", "vanilla")}
    print(f"Test split, balanced over ages; shots by training count (many > {cfg.many_shot}, few < {cfg.few_shot}):")
    print(format_shot_table(runs))
    print("\n" + closing_sentence(runs))
    print(f"\nCompare the two runs (experiment '{demo.experiment}') in the MLflow UI:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {cfg.tracking_uri} --host 127.0.0.1 --port 5000\n"
          f"  then open http://127.0.0.1:5000")
    return runs


def closing_sentence(runs: dict) -> str:
    from groupdir.metrics import selected

    ours, theirs = selected(runs["groupdir"]), selected(runs["vanilla"])
    return (f"Validation selected Group-DIR's {runs['groupdir']['selected_route']} route. On the test split, rare "
            f"(few-shot) ages: MAE {ours['mae/few']:.2f} for Group-DIR, {theirs['mae/few']:.2f} for vanilla; "
            f"balanced MAE {ours['bmae/all']:.2f} vs {theirs['bmae/all']:.2f}; frequent (many-shot) ages: "
            f"{ours['mae/many']:.2f} vs {theirs['mae/many']:.2f}. One short CPU run of each; docs/results.md "
            f"compares them over paired seeds.")
