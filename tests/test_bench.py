import json

import pytest

from groupdir.bench import METHODS, bench_method, claims


def test_bench_method_writes_a_table_with_every_method_and_the_claims(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    table = bench_method(tmp_path, seeds=1, train_size=300, epochs=1,
                         overrides=["image_size=16", "batch_size=64", "num_groups=5"], tracking_uri=tracking)
    assert (tmp_path / "method.md").read_text() == table
    for name in METHODS:
        assert f"| {name} |" in table
    assert "soft labels beat cross-entropy in group accuracy" in table
    raw = json.loads((tmp_path / "method.json").read_text())
    assert set(raw) == set(METHODS) and all(len(runs) == 1 for runs in raw.values())
    # A second call resumes: every run is already finished, nothing is retrained.
    before = {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/results.json")}
    bench_method(tmp_path, seeds=1, train_size=300, epochs=1,
                 overrides=["image_size=16", "batch_size=64", "num_groups=5"], tracking_uri=tracking)
    assert before == {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/results.json")}


def test_claims_verdicts_follow_the_numbers():
    def run(few, median, acc):
        return {"predicted": {"mae/few": few, "mae/median": median, "group_acc": acc}}

    results = {"Group-DIR": [run(5, 3, 0.6)], "vanilla": [run(9, 2, 0.3)], "Group-DIR, CE labels": [run(6, 3, 0.7)]}
    lines = claims(results)
    assert "few-shot MAE vs vanilla: holds" in lines[1]
    assert "median-shot MAE vs vanilla: does NOT hold" in lines[0]
    results["vanilla"][0]["predicted"]["mae/median"] = None  # an empty shot, as results.json stores it
    assert "cannot be tested" in claims(results)[0]
    assert "group accuracy: does NOT hold" in lines[2]


def test_bench_loader_measures_every_loader_side_by_side(tmp_path):
    from groupdir.bench import LOADER_ENCODINGS, bench_loader

    table = bench_loader(tmp_path, images=40, sizes=[32], workers=1, batch_size=8, epochs=1)
    row = [line for line in table.splitlines() if line.startswith("| 32 |")][0]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 3 + len(LOADER_ENCODINGS)
    assert all(float(cell.split()[0]) > 0 for cell in cells[1:])
    assert (tmp_path / "loader.md").read_text() == table


def test_bench_train_prints_per_worker_rates_and_scaling(tmp_path):
    from groupdir.bench import bench_train

    table = bench_train(tmp_path, worker_counts=(1, 2), train_size=300, epochs=2, batch_size=32,
                        overrides=["image_size=16", "num_groups=5"], tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [row[0] for row in rows] == ["1", "2"]
    assert float(rows[0][3]) == 1.0  # the 1-worker run is the reference
    for workers, total, per_worker, efficiency in rows:
        assert float(total) > 0 and abs(float(total) / int(workers) - float(per_worker)) <= 1
    assert float(rows[1][3]) == pytest.approx(float(rows[1][2]) / float(rows[0][2]), abs=0.01)


def test_bench_ceiling_compares_the_loader_with_a_resident_batch(tmp_path):
    from groupdir.bench import bench_ceiling

    text = bench_ceiling(tmp_path, backbone="resnet18", image_size=16, batch_size=8, steps=2, loader_workers=1,
                         images=40, source_size=32)
    rates = [float(line.split("|")[2]) for line in text.splitlines() if line.startswith("| batch") or
             line.startswith("| FFCV")]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)
    assert "Loader overhead:" in text and (tmp_path / "ceiling.md").read_text() == text


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
