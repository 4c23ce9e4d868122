import numpy as np
import pytest

from groupdir.data import read_dir_table
from groupdir.data.synth import SynthSpec, render_face, sample_ages, write_synth
from groupdir.errors import OutputError


def test_training_ages_are_skewed_and_eval_splits_balanced():
    ages = sample_ages(SynthSpec(train=6000, seed=0))
    counts = np.bincount(ages["train"], minlength=100)
    assert counts[20:45].sum() > 0.5 * counts.sum()       # dense in the 20s-40s
    assert (counts > 100).sum() >= 10 and (counts < 20).sum() >= 20  # many-shot and few-shot ages exist
    assert counts[:10].sum() + counts[80:].sum() < 0.05 * counts.sum()  # thin tails
    eval_counts = np.bincount(ages["test"], minlength=100)
    assert eval_counts.max() <= 12 and eval_counts.min() >= 4


def test_render_is_deterministic_and_changes_smoothly_with_age():
    def face(age, seed=0):
        return render_face(age, np.random.default_rng(seed), 48).astype(np.float64)

    assert np.array_equal(face(30), face(30))
    # Same nuisance draw: a nearby age looks closer than a distant age.
    near = np.abs(face(30) - face(33)).mean()
    far = np.abs(face(30) - face(80)).mean()
    assert near < far


def test_write_synth_layout_is_valid_and_refuses_to_overwrite(tmp_path):
    spec = SynthSpec(train=50, eval_cap=1, eval_min=1, image_size=24, seed=3)
    csv = write_synth(tmp_path / "s", spec)
    table = read_dir_table(tmp_path / "s")
    assert csv.name == "synth_age.csv" and table.size("train") == 50 and table.size("test") == 100
    with pytest.raises(FileExistsError, match="--force"):
        write_synth(tmp_path / "s", spec)
    first = csv.read_text()
    write_synth(tmp_path / "s", spec, force=True)
    assert csv.read_text() == first  # deterministic for a seed
    assert not list(tmp_path.glob(".s.tmp-*"))  # no temporary folder left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'file'}: it is a file, not a folder"):
        write_synth(tmp_path / "file", spec)
