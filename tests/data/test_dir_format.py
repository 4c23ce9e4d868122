
import numpy as np
import pytest
import torch
from PIL import Image

from groupdir.data import DataError, read_dir_table
from groupdir.data.loaders import DIRImageDataset


@pytest.fixture
def root(tmp_path):
    """A valid 6-row DIR root: two images per split."""
    (tmp_path / "img").mkdir()
    rows = ["age,path,split"]
    for i, split in enumerate(["train", "train", "val", "val", "test", "test"]):
        Image.fromarray(np.full((20, 24, 3), i * 30, np.uint8)).save(tmp_path / f"img/{i}.jpg")
        rows.append(f"{20 + i},img/{i}.jpg,{split}")
    (tmp_path / "agedb.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def rewrite_line(root, line_number, text):
    lines = (root / "agedb.csv").read_text().splitlines()
    lines[line_number - 1] = text
    (root / "agedb.csv").write_text("\n".join(lines) + "\n")


def test_valid_root_reads_every_split(root):
    table = read_dir_table(root)
    assert table.labels["train"].tolist() == [20.0, 21.0]
    assert table.labels["train"].dtype == np.float64
    assert table.paths["test"][1] == root / "img/5.jpg"
    assert table.csv.name == "agedb.csv"


@pytest.mark.parametrize("line, message", [
    ("nan,img/1.jpg,train", r"line 3 \(path 'img/1.jpg'\): field 'age': 'nan' is not a finite number"),
    ("-4,img/1.jpg,train", r"line 3 .*field 'age': '-4' is negative"),
    ("old,img/1.jpg,train", r"line 3 .*field 'age': 'old' is not a number"),
    (",img/1.jpg,train", r"line 3 .*field 'age': '' is not a number"),
    ("21,img/1.jpg,holdout", r"line 3 .*field 'split': 'holdout' is not one of train, val, test"),
    ("21,img/missing.jpg,train", r"line 3 \(path 'img/missing.jpg'\): field 'path': image file is missing"),
])
def test_bad_rows_name_the_line_path_and_field(root, line, message):
    rewrite_line(root, 3, line)
    with pytest.raises(DataError, match=message):
        read_dir_table(root)


def test_blank_line_is_reported_at_its_true_line_number(root):
    rewrite_line(root, 4, "")
    with pytest.raises(DataError, match=r"line 4 \(path ''\): field 'age': '' is not a number"):
        read_dir_table(root)


def test_non_integer_labels_stay_exact(root):
    rewrite_line(root, 2, "0.7,img/0.jpg,train")
    table = read_dir_table(root)
    label = DIRImageDataset(table.paths["train"], table.labels["train"], 8, train=True)[0][1]
    assert label.dtype == torch.float64 and label.item() == 0.7  # float32 would put 0.7 in bin 6 of width 0.1


def test_corrupt_and_truncated_images_are_caught(root):
    (root / "img/2.jpg").write_bytes(b"this is not a jpeg")
    data = (root / "img/3.jpg").read_bytes()
    (root / "img/3.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        read_dir_table(root)
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "line 4 (path 'img/2.jpg'): field 'path': image cannot be decoded" in text
    assert "line 5 (path 'img/3.jpg'): field 'path': image cannot be decoded" in text


def test_every_problem_of_every_row_is_listed_in_one_error(root):
    rewrite_line(root, 2, "old,img/0.jpg,holdout")
    rewrite_line(root, 5, "23,img/gone.jpg,val")
    with pytest.raises(DataError) as err:
        read_dir_table(root)
    text = str(err.value)
    assert "3 problem(s)" in text
    assert text.index("line 2 (path 'img/0.jpg'): field 'age': 'old' is not a number") \
        < text.index("line 2 (path 'img/0.jpg'): field 'split': 'holdout'") \
        < text.index("line 5 (path 'img/gone.jpg'): field 'path': image file is missing")


def test_many_bad_rows_are_listed_up_to_twenty(root):
    rows = ["age,path,split"] + ["-1,img/0.jpg,train" for _ in range(25)]
    (root / "agedb.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"25 problem\(s\)[\s\S]*and 5 more"):
        read_dir_table(root)


def test_missing_column_and_unknown_data_set(root, tmp_path_factory):
    (root / "agedb.csv").write_text("age,file,split\n20,img/0.jpg,train\n")
    with pytest.raises(DataError, match="missing column.*path"):
        read_dir_table(root)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match="cannot tell the data set"):
        read_dir_table(empty)
    with pytest.raises(DataError, match="imdb_wiki.csv: CSV file not found"):
        read_dir_table(empty, dataset="imdb-wiki-dir")


def test_empty_split_is_refused(root):
    rewrite_line(root, 6, "24,img/4.jpg,val")
    rewrite_line(root, 7, "25,img/5.jpg,val")
    with pytest.raises(DataError, match="split 'test' has no rows"):
        read_dir_table(root)


def test_grayscale_images_become_rgb(root):
    Image.fromarray(np.full((20, 24), 77, np.uint8), mode="L").save(root / "img/0.jpg")
    table = read_dir_table(root)
    pixels, label, index = DIRImageDataset(table.paths["train"], table.labels["train"], 16, train=False)[0]
    assert pixels.shape == (3, 16, 16) and pixels.dtype.is_floating_point is False
    assert label.item() == 20.0 and index == 0
