import json

from groupdir.bench import METHODS, bench_method, claims


def test_bench_method_writes_a_table_with_every_method_and_the_claims(tmp_path):
    table = bench_method(tmp_path, seeds=1, train_size=300, epochs=1,
                         overrides=["image_size=16", "batch_size=64", "num_groups=5"])
    assert (tmp_path / "method.md").read_text() == table
    for name in METHODS:
        assert f"| {name} |" in table
    assert "soft labels beat cross-entropy in group accuracy" in table
    raw = json.loads((tmp_path / "method.json").read_text())
    assert set(raw) == set(METHODS) and all(len(runs) == 1 for runs in raw.values())
    # A second call resumes: every run is already finished, nothing is retrained.
    before = {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/results.json")}
    bench_method(tmp_path, seeds=1, train_size=300, epochs=1,
                 overrides=["image_size=16", "batch_size=64", "num_groups=5"])
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
