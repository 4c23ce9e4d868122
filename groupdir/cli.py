"""The `groupdir` command: parse, validate, call. Errors in input end with one clear line and exit 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from groupdir.atomic import check_writable
from groupdir.config import BACKBONES, PRESET_CSV, WRITE_MODES, Config, load_config, packaged_configs
from groupdir.errors import GroupdirError
from groupdir.progress import Mode, progress_mode

USER_ERRORS = (GroupdirError, FileExistsError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = progress_mode(args.quiet, sys.stderr.isatty())
    try:
        return COMMANDS[args.command](args, progress)
    except USER_ERRORS as err:
        print(f"groupdir {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groupdir", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines (before "
                        "the command: groupdir --quiet synth ...); results and errors are still printed")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_data_commands, add_training_commands, add_tune_command, add_bench_commands, add_server_command):
        add(commands)
    return parser


def add_data_commands(commands) -> None:
    synth = commands.add_parser("synth", help="write a synthetic face-age DIR data set")
    synth.add_argument("out", help="output data root (gets synth_age.csv and images/)")
    synth.add_argument("--train", type=int, default=6000, help="training images (default 6000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64, help="side of the JPEGs in pixels (default 64)")
    synth.add_argument("--eval-cap", type=int, default=12, help="val and test images per age, at most")
    synth.add_argument("--force", action="store_true", help="replace an existing output folder")

    prepare = commands.add_parser("prepare", help="validate a DIR data set and encode it into FFCV shards")
    prepare.add_argument("--root", required=True, help="DIR data root (CSV + images)")
    prepare.add_argument("--out", required=True, help="shards folder to write")
    prepare.add_argument("--dataset", default="auto", choices=("auto", *PRESET_CSV),
                         help="preset naming the CSV (default: the one preset CSV present)")
    prepare.add_argument("--csv", default="", help="CSV file name inside --root (overrides --dataset)")
    prepare.add_argument("--max-resolution", type=int, default=256, help="longest side kept (default 256)")
    prepare.add_argument("--jpeg-quality", type=int, default=90)
    prepare.add_argument("--write-mode", default="smart", choices=WRITE_MODES)
    prepare.add_argument("--num-shards", type=int, default=1, help=".beton files per split (default 1)")
    prepare.add_argument("--workers", type=int, default=-1, help="encoding processes (default: all cores)")
    prepare.add_argument("--label-bin-width", type=float, default=Config().label_bin_width,
                         help="histogram / shot bin width")
    prepare.add_argument("--force", action="store_true", help="replace an existing shards folder")
    prepare.add_argument("--skip-bad", action="store_true", help="leave bad rows out and list them in meta.json")


def add_training_commands(commands) -> None:
    train = commands.add_parser("train", help="train one model and evaluate it on the test split once")
    train.add_argument("--data", help="DIR data root (same as data=...)")
    train.add_argument("--config", action="append", help="YAML config file, or a packaged config by name ("
                                         + ", ".join(packaged_configs()) + "); repeat it to layer a method's over a "
                                         "data set's (later wins); key=value arguments override them")
    train.add_argument("--out", help="run folder (default runs/<method>-<time>); rerun with the same "
                                      "--out to resume an interrupted run")
    train.add_argument("--address", help="join a Ray cluster: auto or ray://host:10001 (same as address=...)")
    train.add_argument("--force", action="store_true", help="start over in a run folder that holds a run")
    train.add_argument("overrides", nargs="*", metavar="key=value")

    config = commands.add_parser("config", help="print the resolved config as YAML, or every key as Markdown")
    config.add_argument("--config", action="append", help="YAML config file or packaged config name (repeatable)")
    config.add_argument("--markdown", action="store_true", help="every key, its type, default and meaning "
                                                                 "(docs/config.md)")
    config.add_argument("overrides", nargs="*", metavar="key=value")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a split")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.add_argument("--force", action="store_true", help="replace an existing --json file")

    demo = commands.add_parser("demo", help="synthetic data -> Group-DIR and vanilla -> shot tables")
    demo.add_argument("--out", default="demo")
    demo.add_argument("--train", type=int, default=4000)
    demo.add_argument("--epochs", type=int, help="per run (default: the demo config's 3, minutes on 2 CPUs)")
    demo.add_argument("--workers", type=int, help="Ray workers per run (default: the demo config's 2)")


def add_tune_command(commands) -> None:
    tune = commands.add_parser("tune", help="Ray Tune sweep over a YAML search space; every trial an MLflow run")
    tune.add_argument("--space", required=True, help="search space file, e.g. tune/quick.yaml")
    tune.add_argument("--data", help="FFCV shards or DIR data root (default: the demo's synthetic shards, "
                                     "written to demo/ first if missing)")
    tune.add_argument("--trials", type=int, help="samples to draw (default: the space's `trials`); with a grid, "
                                                 "runs of the whole grid")
    tune.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs or GPUs hold)")
    tune.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (same as workers=...)")
    tune.add_argument("--name", help="sweep name: MLflow parent run and folder runs/sweeps/NAME (default: the "
                                     "space file's name)")
    tune.add_argument("--out", help="sweep folder (default runs/sweeps/NAME)")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted sweep in its folder")
    tune.add_argument("--address", help="join a Ray cluster: auto or ray://host:10001 (same as address=...)")
    tune.add_argument("overrides", nargs="*", metavar="key=value", help="config keys fixed for every trial")


def add_bench_commands(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    loader = bench_kinds.add_parser("loader", help="FFCV vs a torchvision/PIL DataLoader, images per second")
    loader.add_argument("--out", default="bench/loader")
    loader.add_argument("--images", type=int, default=2000, help="training images, 250-500 px faces")
    loader.add_argument("--sizes", type=int, nargs="+", default=[112, 224], help="output sizes")
    loader.add_argument("--workers", type=int, default=2, help="loader processes for both (default 2)")
    loader.add_argument("--batch-size", type=int, default=128)
    loader.add_argument("--epochs", type=int, default=2, help="timed passes after one warm-up pass")
    method = bench_kinds.add_parser("method", help="Group-DIR and the field's DIR methods (FDS, LDS, "
                                                   "RankSim, Balanced MSE, ConR, RnC + linear) on paired seeds, "
                                                   "a verdict per claim")
    method.add_argument("--out", default="bench/method")
    method.add_argument("--data", default="", help="shards or a DIR data root (default: synthetic, --train images)")
    method.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1, paired across methods (default 3)")
    method.add_argument("--train", type=int, default=4000, help="synthetic training images (default 4000)")
    method.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3: under 40 minutes on 2 CPUs)")
    method.add_argument("--concurrent", type=int, default=2, help="runs at once, one Ray worker and CPU each")
    method.add_argument("--methods", nargs="+", metavar="NAME", help="a subset, by name (default: all; vanilla "
                        "always), e.g. --methods vanilla 'Group-DIR (calibrated)'")
    method.add_argument("--shots", type=int, nargs=2, metavar=("MANY", "FEW"), help="shot thresholds of the table "
                        "(default: the field's 100 and 20 training samples per age); finished runs are re-scored")
    method.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    scaling = bench_kinds.add_parser("train", help="training images/s per Ray worker for 1, 2, ... workers")
    scaling.add_argument("--out", default="bench/train")
    scaling.add_argument("--data", default="", help="shards or a DIR data root (default: synthetic, --train images)")
    scaling.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    scaling.add_argument("--train", type=int, default=2000)
    scaling.add_argument("--epochs", type=int, default=3, help="epoch 1 (FFCV's JIT) is left out of the rate")
    scaling.add_argument("--batch-size", type=int, default=128, help="global batch")
    scaling.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    loss = bench_kinds.add_parser("loss", help="contrastive loss forward + backward: naive, torch, triton, floor")
    loss.add_argument("--out", default="bench/loss")
    loss.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 4096, 8192])
    loss.add_argument("--dims", type=int, nargs="+", default=[128, 2048])
    loss.add_argument("--repeats", type=int, default=3)
    loss.add_argument("--naive-max", type=int, default=512, help="largest B for the B x B x B naive loss")
    ceiling = bench_kinds.add_parser("ceiling", help="one device: FFCV-fed training step vs data already there")
    ceiling.add_argument("--out", default="bench/ceiling")
    ceiling.add_argument("--backbone", default="resnet50", choices=BACKBONES)
    ceiling.add_argument("--image-size", type=int, default=224)
    ceiling.add_argument("--batch-size", type=int, default=256)
    ceiling.add_argument("--steps", type=int, default=30, help="timed steps (and as many warm-up steps)")
    ceiling.add_argument("--loader-workers", type=int, default=8)
    ceiling.add_argument("--images", type=int, default=3000, help="synthetic training images")
    ceiling.add_argument("--source-size", type=int, default=256, help="side of the synthetic JPEGs")


def add_server_command(commands) -> None:
    server = commands.add_parser("mlflow-server", help="run the MLflow tracking server a team shares (sqlite "
                                                        "backend, proxied artifacts) until Ctrl-C")
    server.add_argument("--store", default="mlflow-server", help="folder for its mlflow.db and artifacts/ "
                                                                  "(default ./mlflow-server)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for a cluster's nodes, docs/distributed.md)")
    server.add_argument("--workers", type=int, default=2, help="web server processes (default 2)")


def cmd_synth(args, progress: Mode) -> int:
    from groupdir.data.synth import SynthSpec, write_synth

    started = time.perf_counter()
    csv = write_synth(args.out, SynthSpec(train=args.train, seed=args.seed, image_size=args.image_size,
                                          eval_cap=args.eval_cap), force=args.force, progress=progress)
    print(f"wrote {csv} in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_prepare(args, progress: Mode) -> int:
    from groupdir.data.shards import Encoding, prepare

    started = time.perf_counter()
    meta = prepare(args.root, args.out, args.dataset, args.csv,
                   Encoding(args.max_resolution, args.jpeg_quality, args.write_mode), workers=args.workers,
                   num_shards=args.num_shards, force=args.force, skip_bad=args.skip_bad,
                   label_bin_width=args.label_bin_width, progress=progress)
    rows = ", ".join(f"{split} {count}" for split, count in meta["rows"].items())
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s: {rows} rows"
          + (f"; skipped {len(meta['skipped'])} bad row(s), listed in meta.json" if meta["skipped"] else ""))
    return 0


def cmd_train(args, progress: Mode) -> int:
    from groupdir.driver import train
    from groupdir.metrics import format_shot_table

    cfg = load_training_config(args.config, args.overrides, data=args.data, address=args.address)
    run_dir = Path(args.out or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable(run_dir)
    print(f"run folder {run_dir} (rerun with --out {run_dir} to resume after a crash); MLflow: {cfg.tracking_uri}",
          flush=True)
    results = train(cfg, run_dir, progress=progress, force=args.force)
    print(format_shot_table({cfg.method: results}))
    print(f"results: {run_dir / 'results.json'}   checkpoint: {run_dir / 'checkpoint.pt'}")
    print(f"MLflow: {run_link(cfg, run_dir)}")
    return 0


def run_link(cfg, run_dir: Path) -> str:
    """Where the run is in MLflow: its page on a tracking server, else its id and store."""
    import json

    from groupdir.driver import RUN_RECORD
    from groupdir.tracking import Tracker, run_page

    run_id = json.loads((run_dir / RUN_RECORD).read_text())["mlflow_run_id"]
    if not cfg.tracking_uri.startswith(("http://", "https://")):
        return f"run {run_id}, experiment '{cfg.experiment}' in {cfg.tracking_uri}"
    experiment_id = Tracker(cfg.tracking_uri).run(run_id).info.experiment_id
    return run_page(cfg.tracking_uri, experiment_id, run_id)


def load_training_config(path, overrides, data=None, address=None):
    """The config from file and key=value, with --data/--address and the one environment variable
    the CLI honours, MLFLOW_TRACKING_URI (read here, so nothing downstream reads the environment)."""
    extra = {"data": data, "address": address}
    return with_tracking_uri(load_config(path, list(overrides) + [f"{k}={v}" for k, v in extra.items() if v]))


def with_tracking_uri(cfg):
    """tracking_uri, else $MLFLOW_TRACKING_URI, else the default, resolved."""
    from groupdir.tracking import resolve_uri

    return cfg.replace(tracking_uri=resolve_uri(cfg.tracking_uri or environment_tracking_uri()))


def environment_tracking_uri() -> str:
    """MLflow's own variable, the one piece of the environment groupdir honours (read here only)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "")


def cmd_config(args, progress: Mode) -> int:
    import yaml

    from groupdir.config import config_reference

    if args.markdown:
        print(config_reference(), end="")
    else:
        print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def cmd_eval(args, progress: Mode) -> int:
    from groupdir.atomic import write_json_atomic
    from groupdir.evaluation import evaluate_checkpoint
    from groupdir.metrics import format_shot_table

    if args.json:
        check_writable(args.json, file=True)
    if args.json and Path(args.json).exists() and not args.force:
        raise FileExistsError(f"{args.json} exists; pass --force to replace it")
    results = evaluate_checkpoint(args.checkpoint, args.data, args.split, progress=progress)
    print(f"{args.split} split of {args.data}")
    print(format_shot_table({Path(args.checkpoint).parent.name: results}))
    if args.json:
        write_json_atomic(Path(args.json), results)
    return 0


def cmd_demo(args, progress: Mode) -> int:
    from groupdir.demo import run_demo

    check_writable(args.out)
    run_demo(Path(args.out), args.train, args.epochs, args.workers, environment_tracking_uri(), progress)
    return 0


def cmd_tune(args, progress: Mode) -> int:
    from groupdir import sweep
    from groupdir.data import synthetic_shards
    from groupdir.tracking import ui_hint

    spec = sweep.load_space(args.space, name=args.name or "", trials=args.trials, max_concurrent=args.max_concurrent)
    extra = {"data": args.data, "workers": args.workers_per_trial, "address": args.address}
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in extra.items() if value]
    cfg = with_tracking_uri(sweep.sweep_config(spec, overrides))  # a bad space stops here, before data or Ray
    out = Path(args.out or f"runs/sweeps/{spec.name}")
    check_writable(out)
    if not cfg.data:  # the embedded default: the demo's synthetic shards, written to demo/ when missing
        check_writable("demo")
        cfg = cfg.replace(data=str(synthetic_shards(Path("demo"), progress=progress)))
    try:
        summary = sweep.run_sweep(spec, cfg, out, resume=args.resume)
    except KeyboardInterrupt:
        print(f"\nsweep interrupted; continue it with the same command plus --resume (folder {out})", file=sys.stderr)
        return 130
    print(f"\n{summary['trials']} trials: {summary['finished']} finished, {summary['stopped_early']} stopped early "
          f"by ASHA, {summary['failed']} failed. Best first:\n")
    print(sweep.format_trials(summary["rows"], spec, cfg.select_metric)["markdown"])
    best = summary["best"]
    if best is None:
        print("no trial finished", file=sys.stderr)
        return 1
    print(f"best on validation: trial {best['trial']}  " + "  ".join(f"{k}={v}" for k, v in best["params"].items())
          + f"\n  val {cfg.select_metric} {best['best_val']:.3f}; test MAE {best['test'].get('test/mae/all', float('nan')):.3f}, "
          f"bMAE {best['test'].get('test/bmae/all', float('nan')):.3f}"
          f"\n  checkpoint: {out / 'trials' / best['trial'] / 'checkpoint.pt'}"
          f"\nAll trials: {out / 'trials.csv'}; in MLflow, parent run {summary['mlflow_parent_run_id']}:\n"
          + ui_hint(cfg.tracking_uri, cfg.experiment))
    return 0


def cmd_bench(args, progress: Mode) -> int:
    from groupdir import bench

    check_writable(args.out)
    tracking_uri = environment_tracking_uri()
    if args.kind == "loader":
        bench.bench_loader(Path(args.out), images=args.images, sizes=args.sizes, workers=args.workers,
                           batch_size=args.batch_size, epochs=args.epochs, progress=progress)
    elif args.kind == "method":
        bench.bench_method(Path(args.out), seeds=args.seeds, train_size=args.train, epochs=args.epochs,
                           concurrent=args.concurrent, overrides=args.overrides, tracking_uri=tracking_uri,
                           methods=args.methods, data=args.data, shots=tuple(args.shots) if args.shots else None,
                           progress=progress)
    elif args.kind == "loss":
        bench.bench_loss(Path(args.out), batch_sizes=args.batch_sizes, dims=args.dims, repeats=args.repeats,
                         naive_max=args.naive_max, progress=progress)
    elif args.kind == "train":
        bench.bench_train(Path(args.out), worker_counts=tuple(args.workers), train_size=args.train,
                          epochs=args.epochs, batch_size=args.batch_size, overrides=args.overrides,
                          tracking_uri=tracking_uri, data=args.data, progress=progress)
    else:
        bench.bench_ceiling(Path(args.out), backbone=args.backbone, image_size=args.image_size,
                            batch_size=args.batch_size, steps=args.steps, loader_workers=args.loader_workers,
                            images=args.images, source_size=args.source_size, progress=progress)
    return 0


def cmd_mlflow_server(args, progress: Mode) -> int:
    from groupdir.server import MlflowServer, answers, server_uri

    if answers(server_uri(args.host, args.port)):
        raise GroupdirError(f"something already answers on {server_uri(args.host, args.port)}; pick another --port")
    server = MlflowServer(args.store, args.host, args.port, args.workers)
    # A SIGTERM (systemd, kill) must stop the server too: it runs in a process group of its own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.start()
    print(f"MLflow tracking server on {server.uri} (store {server.store}, its log {server.store / 'server.log'})\n"
          f"  runs:   MLFLOW_TRACKING_URI={server.uri} groupdir train ...   (or tracking_uri={server.uri})\n"
          f"  UI:     open {server.uri} in a browser\n"
          f"Ctrl-C stops it.", flush=True)
    try:
        code = server.process.wait()
        print(f"groupdir mlflow-server: the server exited with code {code}; see {server.store / 'server.log'}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


COMMANDS = {"synth": cmd_synth, "prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval, "demo": cmd_demo,
            "tune": cmd_tune, "bench": cmd_bench, "config": cmd_config, "mlflow-server": cmd_mlflow_server}

if __name__ == "__main__":
    sys.exit(main())
