import json
import re

import pytest

import numpy as np
import torch

from groupdir.bench.method import METHODS, bench_method, method_table, paired, slug, verdict
from groupdir.errors import ConfigError
from groupdir.evaluation import evaluate_checkpoint


@pytest.mark.slow
def test_bench_method_pairs_seeds_and_gives_a_verdict_per_claim(tiny_synth, tmp_path, local_ray):
    # Two methods on the tiny data root keep it short, one of them two-stage (an RnC pretraining per
    # seed first); the table's arithmetic is tested below.
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny = ["image_size=16", "batch_size=64", "num_groups=5", "crt_epochs=1"]
    methods = ["vanilla", "Group-DIR (two-stage)"]
    table = bench_method(tmp_path, seeds=2, epochs=1, overrides=tiny, tracking_uri=tracking, methods=methods,
                         data=str(tiny_synth))
    assert (tmp_path / "method.md").read_text() == table
    for name in METHODS:
        assert (f"| {name} |" in table) == (name in methods)
    for route in ("predicted", "adjusted_soft", "oracle", "centroid"):
        assert f"| Group-DIR (two-stage) | {route} |" in table
    assert "- Group-DIR (two-stage) lowers mae/few vs vanilla: " in table
    assert "vs SQINV + LDS" not in table  # no comparison with a method that did not run
    assert "Group-DIR (two-stage): validation chose seed 0: " in table
    assert "Beat vanilla on few-shot MAE (paired, by more than two standard errors): " in table
    raw = json.loads((tmp_path / "method.json").read_text())
    assert list(raw) == methods and all(len(runs) == 2 for runs in raw.values())
    # Seeds are paired: seed s of every method trained with seed=s, the two-stage one on seed s's RnC.
    for name in methods:
        for seed in (0, 1):
            config = json.loads((tmp_path / "runs" / f"{slug(name)}-seed{seed}" / "run.json").read_text())["config"]
            assert config["seed"] == seed and config["epochs"] == 1
    for seed in (0, 1):
        pretraining = json.loads((tmp_path / "runs" / f"rnc-seed{seed}" / "run.json").read_text())["config"]
        assert pretraining["method"] == "rnc" and pretraining["seed"] == seed
        two_stage = json.loads((tmp_path / "runs" / f"group-dir-two-stage-seed{seed}" / "run.json").read_text())
        assert two_stage["config"]["init_from"] == str(tmp_path / "runs" / f"rnc-seed{seed}" / "checkpoint.pt")
    # Two-stage Group-DIR fine-tunes its seed's RnC encoder: close to it after one epoch, not equal.
    rnc = torch.load(tmp_path / "runs" / "rnc-seed0" / "checkpoint.pt", weights_only=True)["model"]
    fine_tuned = torch.load(tmp_path / "runs" / "group-dir-two-stage-seed0" / "checkpoint.pt", weights_only=True)["model"]
    conv = "encoder.conv1.weight"
    assert not torch.equal(fine_tuned[conv], rnc[conv])
    assert (fine_tuned[conv] - rnc[conv]).norm() / rnc[conv].norm() < 0.5
    history = json.loads((tmp_path / "runs" / "group-dir-two-stage-seed0" / "history.json").read_text())
    assert {"train/reg", "train/cls", "train/grc"} <= set(history[0])
    # A second call resumes: every run is already finished, nothing is retrained.
    before = {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/results.json")}
    assert len(before) == 6
    bench_method(tmp_path, seeds=2, epochs=1, overrides=tiny, tracking_uri=tracking, methods=methods,
                 data=str(tiny_synth))
    assert before == {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/results.json")}
    # Other shot thresholds re-score the finished runs' checkpoints on test: same overall error.
    first = json.loads((tmp_path / "method.json").read_text())
    table = bench_method(tmp_path, seeds=2, epochs=1, overrides=tiny, tracking_uri=tracking, methods=methods,
                         data=str(tiny_synth), shots=(8, 4))
    assert "shots re-scored: many > 8, few < 4 training samples per age" in table
    assert before == {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/results.json")}
    rescored = json.loads((tmp_path / "method.json").read_text())
    again = evaluate_checkpoint(tmp_path / "runs" / "vanilla-seed1" / "checkpoint.pt", str(tiny_synth), "test",
                                device="cpu", shots=(8, 4))
    assert rescored["vanilla"][1]["predicted"] == again["predicted"]
    assert rescored["vanilla"][1]["predicted"]["mae/all"] == pytest.approx(first["vanilla"][1]["predicted"]["mae/all"])
    assert rescored["vanilla"][1]["predicted"]["n/many"] != first["vanilla"][1]["predicted"]["n/many"]
    with pytest.raises(FileExistsError, match="other settings"):
        bench_method(tmp_path, seeds=2, epochs=2, overrides=tiny, tracking_uri=tracking, methods=methods,
                     data=str(tiny_synth))
    with pytest.raises(ConfigError, match="vanilla missing"):
        bench_method(tmp_path / "other", methods=["Group-DIR (paper)"])


def fake_run(route: str, **metrics) -> dict:
    values = {"mae/all": 8.0, "mae/many": 5.0, "mae/median": 6.0, "mae/few": 12.0, "bmae/all": 10.0, **metrics}
    return {"selected_route": route, route: values, "calibration": {"shift": [], "tau": 0, "soft_tau": 0,
                                                                     "route_temperature": 1}}


def test_a_claim_holds_only_beyond_two_standard_errors():
    ours = [fake_run("adjusted_soft", **{"mae/few": few}) for few in (9.0, 9.5, 10.0)]
    theirs = [fake_run("predicted", **{"mae/few": few}) for few in (12.0, 12.1, 11.9)]
    mean, error = paired(ours, theirs, "mae/few")
    differences = np.array([9.0 - 12.0, 9.5 - 12.1, 10.0 - 11.9])
    assert mean == pytest.approx(differences.mean()) and error == pytest.approx(differences.std(ddof=1) / 3 ** 0.5)
    assert verdict(mean, error) == "holds"
    assert verdict(-0.5, 0.3).startswith("does NOT hold (within")
    assert verdict(1.0, 0.1).startswith("does NOT hold (the baseline is better")
    assert verdict(-1.0, float("nan")) == "cannot be decided with one seed"
    noisy = [fake_run("predicted", **{"mae/few": few}) for few in (6.0, 12.0, 17.0)]
    assert verdict(*paired(noisy, theirs, "mae/few")).startswith("does NOT hold (within")


def test_method_table_reads_each_methods_headline_route():
    results = {"vanilla": [fake_run("predicted")] * 2, "SQINV + LDS": [fake_run("predicted")] * 2,
               "Group-DIR (calibrated)": [fake_run("adjusted", **{"mae/few": 6.0, "mae/many": 5.2}),
                                          fake_run("adjusted", **{"mae/few": 6.2, "mae/many": 5.3})]}
    table = method_table(results, "synthetic, 4000 training images", 3, [], 1.0)
    assert "- Group-DIR (calibrated) lowers mae/few vs vanilla: holds (-5.90 +- 0.10)" in table
    assert "- Group-DIR (calibrated) lowers mae/few vs SQINV + LDS: holds" in table
    assert "- SQINV + LDS lowers mae/few vs vanilla: does NOT hold (within two standard errors) (+0.00 +- 0.00)" in table
    assert "Beat vanilla on few-shot MAE (paired, by more than two standard errors): Group-DIR (calibrated)." in table
    assert "few-shot MAE at most 0.85x vanilla's: met (0.51x)" in table
    assert "many-shot MAE at most 1.10x vanilla's: met (1.05x)" in table


@pytest.mark.slow
def test_bench_loader_measures_every_loader_side_by_side(tmp_path):
    from groupdir.bench import LOADER_ENCODINGS, bench_loader

    table = bench_loader(tmp_path, images=40, sizes=[32], workers=1, batch_size=8, epochs=1)
    row = [line for line in table.splitlines() if line.startswith("| 32 |")][0]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 3 + len(LOADER_ENCODINGS)
    baseline = float(cells[1])
    for cell in cells[2:]:  # "rate (ratio to torchvision)", the ratio of the rates measured side by side
        rate, ratio = cell.split()
        ratio = float(ratio.strip("()x"))  # both printed rounded: allow for that
        assert ratio == pytest.approx(float(rate) / baseline, abs=0.006 + 0.5 * (1 + ratio) / baseline)
    assert (tmp_path / "loader.md").read_text() == table


@pytest.mark.slow
def test_bench_train_prints_per_worker_rates_and_scaling(tiny_synth, tmp_path, local_ray):
    from groupdir.bench import bench_train

    table = bench_train(tmp_path, worker_counts=(1, 2), epochs=1, batch_size=32, data=str(tiny_synth),
                        overrides=["image_size=16", "num_groups=5"], tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    rates = {workers: json.loads((tmp_path / f"workers-{workers}" / "history.json").read_text())[0]["images_per_second"]
             for workers in (1, 2)}
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [row[0] for row in rows] == ["1", "2"]
    assert float(rows[0][3]) == 1.0  # the 1-worker run is the reference
    for workers, total, per_worker, efficiency in rows:  # the table is each run's own measured rate
        assert float(total) == pytest.approx(rates[int(workers)], abs=0.5)
        assert abs(float(total) / int(workers) - float(per_worker)) <= 1
    assert float(rows[1][3]) == pytest.approx(float(rows[1][2]) / float(rows[0][2]), abs=0.01)


@pytest.mark.slow
def test_bench_ceiling_compares_the_loader_with_a_resident_batch(tmp_path):
    from groupdir.bench import bench_ceiling

    text = bench_ceiling(tmp_path, backbone="resnet18", image_size=16, batch_size=8, steps=2, loader_workers=1,
                         images=40, source_size=32)
    ceiling, fed = [float(line.split("|")[2]) for line in text.splitlines() if line.startswith("| batch") or
                    line.startswith("| FFCV")]
    overhead = float(re.search(r"Loader overhead: (-?[\d.]+)% of the ceiling", text).group(1))
    assert overhead == pytest.approx(100 * (1 - fed / ceiling), abs=0.05 + 100 / min(fed, ceiling))  # rates printed rounded
    assert (tmp_path / "ceiling.md").read_text() == text


@pytest.mark.slow
def test_bench_loss_times_every_backend_beside_the_matmul_floor(tmp_path):
    from groupdir.bench import bench_loss

    text = bench_loss(tmp_path / "loss", batch_sizes=(16, 64), dims=(8,), repeats=1, naive_max=16)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| 8 |")]
    assert [row[1] for row in rows] == ["16", "64"]
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows)  # floor and torch timed
    assert rows[0][3] != "-" and rows[0][5].endswith("x")  # naive timed at B = 16 ...
    assert rows[1][3] == "-" and rows[1][5] == "-"          # ... and skipped above naive_max
    assert (tmp_path / "loss" / "loss.md").read_text() == text  # the folder is made


def test_bench_loss_prints_each_row_as_measured_and_its_progress_apart(tmp_path, capsys):
    from groupdir.bench import bench_loss

    text = bench_loss(tmp_path, batch_sizes=(8, 16), dims=(4,), repeats=1, naive_max=8, progress="lines")
    out, err = capsys.readouterr()
    rows = [line for line in text.splitlines() if line.startswith("| 4 |")]
    assert out.index(rows[0]) < out.index(rows[1]) < out.index("Contrastive loss")  # each row as it is measured
    assert err.splitlines()[0] == "cases measured: 0/2" and err.splitlines()[-1].startswith("cases measured: 2/2 in ")
    bench_loss(tmp_path, batch_sizes=(8,), dims=(4,), repeats=1)
    assert capsys.readouterr().err == ""
