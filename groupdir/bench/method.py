"""`groupdir bench method`: Group-DIR against the field's baselines, decided over paired seeds.

Every method trains on the same synthetic data set (the demo's: 4000 skewed training faces, seed 0)
with the same seeds; seed s of one method is paired with seed s of every other. Each run picks its
epoch, and for Group-DIR its route and the route's calibration, on VALIDATION; the test split is
evaluated once per run. Two-stage methods first pretrain an encoder with Rank-N-Contrast (one
pretraining per seed, shared by the methods that start from it, for as many epochs), then train
on it with init_from. The benchmark prints:

- the field's table: MAE and GM by shot (all / many / median / few), mean +- std over seeds, each
  method at its headline route;
- every route of the Group-DIR runs, with the oracle and centroid references labelled apart;
- for each method against vanilla (and each Group-DIR variant against every baseline, two-stage
  Group-DIR against RnC + linear on the same encoder), the per-seed paired difference of test bMAE,
  MAE and few-/many-shot MAE with its standard error, and a verdict per claim: it "holds" only when
  the mean difference favours the method by more than two standard errors; and, plainly, which
  methods beat vanilla on few-shot MAE.

Runs go two at a time (one Ray worker and one CPU each) on a 2-CPU machine; finished runs are kept,
so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import numpy as np

from groupdir.atomic import write_json_atomic, write_text_atomic
from groupdir.config import config_path, load_config, parse_overrides
from groupdir.data import synthetic_shards
from groupdir.errors import ConfigError
from groupdir.progress import Mode, Progress
from groupdir.tables import markdown_table

class Entry(NamedTuple):
    config: str | None          # a packaged config, or None for the defaults
    overrides: dict             # key=value over it
    pretrained: str | None = None  # a PRETRAINING whose encoder the run starts from (init_from)


# The calibrated variant's settings were chosen on validation (docs/results.md), never on test.
# Each baseline runs with its paper's defaults (groupdir/config.py) on the benchmark's scale.
METHODS = {
    "vanilla": Entry(None, {"method": "vanilla"}),
    "SQINV + LDS": Entry(None, {"method": "vanilla", "reweight": "sqrt_inv", "lds": True}),
    "FDS": Entry(None, {"method": "vanilla", "fds": True}),
    "RankSim": Entry(None, {"method": "ranksim"}),
    "Balanced MSE (BMC)": Entry(None, {"method": "balanced_mse", "balanced_mse": "bmc"}),
    "Balanced MSE (GAI)": Entry(None, {"method": "balanced_mse", "balanced_mse": "gai"}),
    "ConR": Entry(None, {"method": "conr"}),
    "RnC + linear": Entry(None, {"method": "vanilla", "freeze_encoder": True, "lr": 0.01}, "RnC"),
    "Group-DIR (paper)": Entry("paper", {}),
    "Group-DIR (calibrated)": Entry("calibrated", {}),
    "Group-DIR (two-stage)": Entry("calibrated", {}, "RnC"),
}
PRETRAINING = {"RnC": Entry(None, {"method": "rnc"})}
BASELINES = ("vanilla", "SQINV + LDS", "FDS", "RankSim", "Balanced MSE (BMC)", "Balanced MSE (GAI)", "ConR",
             "RnC + linear")
SHOT_COLUMNS = tuple(f"{metric}/{shot}" for metric in ("mae", "gm") for shot in ("all", "many", "median", "few"))
EXPERIMENT = "bench-method"
ROUTE_COLUMNS = ("mae/all", "mae/many", "mae/few", "bmae/all", "group_acc/many", "group_acc/median", "group_acc/few",
                 "group_dist")
CLAIMS = ("bmae/all", "mae/all", "mae/few", "mae/many")
GOALS = (("mae/few", 0.85, "few-shot MAE at most 0.85x vanilla's"),
         ("mae/many", 1.10, "many-shot MAE at most 1.10x vanilla's"))


def bench_method(out: Path, seeds: int = 3, train_size: int = 4000, epochs: int = 3, concurrent: int = 2,
                 overrides: list[str] | None = None, tracking_uri: str = "", methods: list[str] | None = None,
                 data: str = "", shots: tuple[int, int] | None = None, progress: Mode = "off") -> str:
    """Every method (or `methods`) for seeds 0 .. seeds-1 on the same data: `data` (shards or a DIR
    data root), else the demo's synthetic set of `train_size` training faces; the table with paired
    differences and verdicts goes to out/method.md. Finished runs are kept: a rerun resumes.

    `shots` (many, few): the table's shot thresholds instead of the field's 100 / 20 training
    samples per label, which leave a small training set without many-shot ages. Each run's
    checkpoint is evaluated on test again with them: the same model, route and calibration (chosen
    on validation by a metric over all ages, which shots do not change), other shot metrics.

    `progress` shows the data's writing and encoding, then the methods' runs done (a finished run
    found in `out` counts at once; pretrainings do not count); each run's start and end is printed
    as a line either way."""
    from groupdir.checkpoint import RESULTS
    from groupdir.driver import ray_session, train
    from groupdir.tracking import Tracker, check_reachable, resolve_uri

    overrides = list(overrides or [])
    methods = list(methods or METHODS)
    unknown = [name for name in methods if name not in METHODS]
    if unknown or "vanilla" not in methods:
        raise ConfigError(f"--methods: {', '.join(unknown) or 'vanilla missing'}; pick from {', '.join(METHODS)} "
                         f"(vanilla always: the goals are against it)")
    data = str(Path(data).resolve()) if data else ""
    stages = sorted({METHODS[name].pretrained for name in methods} - {None})
    settings = {"data": data or f"synthetic, {train_size} training images", "epochs": epochs, "overrides": overrides,
                "methods": {name: described(METHODS[name]) for name in methods},
                **({"pretraining": {name: described(PRETRAINING[name]) for name in stages}} if stages else {})}
    out.mkdir(parents=True, exist_ok=True)
    if (out / "settings.json").is_file():
        if json.loads((out / "settings.json").read_text()) != settings:
            raise FileExistsError(f"{out} holds a benchmark run with other settings (see {out / 'settings.json'}); "
                                  f"pick another --out or delete it")
    else:
        write_json_atomic(out / "settings.json", settings)
    data = data or str(synthetic_shards(out, train_size, progress=progress))
    started = time.perf_counter()
    jobs = [(name, seed) for seed in range(seeds) for name in methods]
    runs_done = Progress(len(jobs), "runs done", progress)  # shown while the runs go, below

    def run(name: str, seed: int, entry: Entry, stage_one: Future | None = None) -> dict:
        run_dir = out / "runs" / f"{slug(name)}-seed{seed}"
        if (run_dir / RESULTS).is_file():
            return json.loads((run_dir / RESULTS).read_text())
        common = {"data": data, "epochs": epochs, "seed": seed, "workers": 1, "cpus_per_worker": 1,
                  "experiment": EXPERIMENT, "tracking_uri": tracking_uri}
        if stage_one is not None:
            try:
                stage_one.result()  # the pretraining of this seed has finished
            except Exception as err:
                raise RuntimeError(f"{name}, seed {seed}: its {entry.pretrained} pretraining failed: {err}") from err
            common["init_from"] = str(out / "runs" / f"{slug(entry.pretrained)}-seed{seed}" / "checkpoint.pt")
        cfg = load_config(entry.config, {**entry.overrides, **common, **parse_overrides(overrides)})
        runs_done.write(f"[{time.perf_counter() - started:6.0f} s] {name}, seed {seed}")
        results = train(cfg, run_dir, progress="off")
        runs_done.write(f"[{time.perf_counter() - started:6.0f} s] {name}, seed {seed}: done")
        return results

    # The MLflow store and experiment exist before the runs start, so that concurrent runs never race
    # to create them.
    tracking_uri = resolve_uri(tracking_uri)
    check_reachable(tracking_uri)
    Tracker(tracking_uri).experiment_id(EXPERIMENT)
    if shots and not load_config(None, parse_overrides(overrides)).select_metric.endswith("/all"):
        raise ConfigError("--shots re-scores finished runs: their select_metric must not depend on shots (use */all)")
    with ray_session(num_cpus=concurrent), ThreadPoolExecutor(concurrent) as pool, runs_done:
        # Pretrainings are queued first: a run waiting for one never holds up the one it waits for.
        stage_one = {(stage, seed): pool.submit(run, stage, seed, PRETRAINING[stage])
                     for seed in range(seeds) for stage in stages}
        futures = [pool.submit(run, name, seed, METHODS[name], stage_one.get((METHODS[name].pretrained, seed)))
                   for name, seed in jobs]
        try:
            for future in as_completed(futures):
                future.result()  # the first run to fail stops the benchmark
                runs_done.update()
        except BaseException:  # a failed run or Ctrl-C: the runs not started yet never start
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    finished = dict(zip(jobs, (future.result() for future in futures)))
    if shots:
        finished = {(name, seed): rescored(out / "runs" / f"{slug(name)}-seed{seed}", data, shots, run)
                    for (name, seed), run in finished.items()}
    results = {name: [finished[name, seed] for seed in range(seeds)] for name in methods}
    minutes = (time.perf_counter() - started) / 60
    table = method_table(results, settings["data"], epochs, overrides, minutes, shots)
    write_text_atomic(out / "method.md", table)
    write_json_atomic(out / "method.json", results)
    print(table)
    return table


def rescored(run_dir: Path, data: str, shots: tuple[int, int], results: dict) -> dict:
    """A finished run's results with its test metrics evaluated again at other shot thresholds."""
    from groupdir.evaluation import evaluate_checkpoint

    return {**results, **evaluate_checkpoint(run_dir / "checkpoint.pt", data, "test", device="cpu", shots=shots)}


def described(entry: Entry) -> dict:
    """An entry as the settings record it: the config's text, so that an edited config is noticed."""
    return {"config": config_path(entry.config).read_text() if entry.config else None, **entry.overrides,
            **({"pretrained": entry.pretrained} if entry.pretrained else {})}


# ======================================== tables ===========================================

def method_table(results: dict[str, list[dict]], data: str, epochs: int, overrides: list[str],
                 minutes: float, shots: tuple[int, int] | None = None) -> str:
    seeds = len(next(iter(results.values())))
    lines = [f"Data: {data}; {epochs} epochs, seeds 0-{seeds - 1} paired "
             f"across methods" + (f"; overrides: {' '.join(overrides)}" if overrides else "")
             + f"; this call's wall time {minutes:.1f} min"
             + (f"; shots re-scored: many > {shots[0]}, few < {shots[1]} training samples per age" if shots else "")
             + ".",
             "Test split, each method's headline route (chosen on validation for the calibrated variants), "
             "mean +- std over seeds:", "",
             *markdown_table(["method", "route", *SHOT_COLUMNS, "bmae/all"],
                             [[name, ", ".join(sorted({run["selected_route"] for run in runs})),
                               *(spread(metric(runs, column)) for column in (*SHOT_COLUMNS, "bmae/all"))]
                              for name, runs in results.items()], text_columns=2)]
    lines += ["", "Every route of the Group-DIR runs (test, mean +- std over seeds; oracle and centroid read the true "
                  "group: references, not test results):", "",
              *markdown_table(["method", "route", *ROUTE_COLUMNS],
                              [[name, route, *(spread(metric(runs, column, route)) for column in ROUTE_COLUMNS)]
                               for name, runs in results.items() if "oracle" in runs[0]
                               for route in ("predicted", "soft", "adjusted", "adjusted_soft", "oracle", "centroid")],
                              text_columns=2)]
    for name, runs in results.items():
        if "calibration" in runs[0] and runs[0]["calibration"]["shift"]:
            chosen = "; ".join(f"seed {seed}: {describe_route(run)}" for seed, run in enumerate(runs))
            lines += ["", f"{name}: validation chose {chosen}."]
    lines += ["", f"Paired differences, method minus baseline, per seed (negative: the method errs less); "
                  f"mean +- standard error over {seeds} seeds:", ""]
    comparisons, verdicts = [], []
    for ours, theirs in comparisons_of(list(results)):
        cells = []
        for column in CLAIMS:
            mean, error = paired(results[ours], results[theirs], column)
            cells.append(f"{mean:+.2f} +- {error:.2f}")
            verdicts.append(f"- {ours} lowers {column} vs {theirs}: {verdict(mean, error)} "
                            f"({mean:+.2f} +- {error:.2f})")
        comparisons.append([f"{ours} vs {theirs}", *cells])
    lines += markdown_table(["comparison", *CLAIMS], comparisons)
    lines += ["", "Claims (a claim holds when the paired difference favours the method by more than two standard "
                  "errors):"] + verdicts
    if "vanilla" in results and len(results) > 1:
        verdicts_few = {name: verdict(*paired(results[name], results["vanilla"], "mae/few"))
                        for name in results if name != "vanilla"}
        beat = [name for name, said in verdicts_few.items() if said == "holds"]
        undecided = [name for name, said in verdicts_few.items() if said.startswith("cannot")]
        lines += ["", f"Beat vanilla on few-shot MAE (paired, by more than two standard errors): "
                      f"{', '.join(beat) or 'none'}."
                  + (f" Undecided: {', '.join(undecided)}." if undecided else "")
                  + (" The others do not." if len(beat) + len(undecided) < len(verdicts_few) else "")]
    lines += ["", "Goals against vanilla (ratio of seed means):"]
    for ours in (name for name in results if name.startswith("Group-DIR")):
        for column, limit, text in GOALS:
            ratio = metric(results[ours], column).mean() / metric(results["vanilla"], column).mean()
            lines.append(f"- {ours}: {text}: {'met' if ratio <= limit else 'NOT met'} ({ratio:.2f}x)")
    return "\n".join(lines) + "\n"


def comparisons_of(names: list[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs: every method against vanilla; each Group-DIR variant against every
    baseline too, and two-stage Group-DIR against RnC + linear, its control on the same encoder."""
    pairs = [(name, "vanilla") for name in names if name != "vanilla" and "vanilla" in names]
    pairs += [(ours, theirs) for ours in names if ours.startswith("Group-DIR")
              for theirs in BASELINES if theirs in names and theirs != "vanilla"]
    return pairs


def describe_route(run: dict) -> str:
    calibration, route = run["calibration"], run["selected_route"]
    if route == "adjusted":
        return f"adjusted (tau {calibration['tau']:g})"
    if route == "adjusted_soft":
        return f"adjusted_soft (tau {calibration['soft_tau']:g}, T {calibration['route_temperature']:g})"
    return route


def paired(ours: list[dict], theirs: list[dict], column: str) -> tuple[float, float]:
    """Mean and standard error of the per-seed difference ours - theirs (NaN error for one seed)."""
    differences = metric(ours, column) - metric(theirs, column)
    error = differences.std(ddof=1) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    return float(differences.mean()), float(error)


def verdict(mean: float, error: float) -> str:
    if math.isnan(mean):
        return "cannot be tested (no test samples in that shot)"
    if math.isnan(error):
        return "cannot be decided with one seed"
    if mean < -2 * error:
        return "holds"
    if mean > 2 * error:
        return "does NOT hold (the baseline is better by more than two standard errors)"
    return "does NOT hold (within two standard errors)"


def metric(runs: list[dict], column: str, route: str | None = None) -> np.ndarray:
    """One metric over seeds, of `route` or of each run's headline route (the one its validation
    selected); null (an empty shot in results.json) becomes NaN."""
    values = [run[route or run["selected_route"]].get(column) for run in runs]
    return np.array([math.nan if value is None else value for value in values], dtype=float)


def spread(values: np.ndarray) -> str:
    """mean +- sample standard deviation over seeds."""
    return f"{values.mean():.2f} +- {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
