"""The DIR layout: DATA_ROOT/<name>.csv with columns age,path,split plus the images it points to.

Every row is checked before any training starts: a bad row is reported with the CSV file, its line
number, the path and the field, so that a missing AgeDB file fails here and not in a worker hours later.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from groupdir.config import PRESET_CSV
from groupdir.errors import DataError
from groupdir.progress import Mode, Progress

REQUIRED_COLUMNS = ("age", "path", "split")
SPLITS = ("train", "val", "test")
MAX_LISTED = 20


@dataclass
class DIRTable:
    root: Path
    csv: Path
    labels: dict[str, np.ndarray]  # split -> float64 labels
    paths: dict[str, list[Path]]   # split -> absolute image paths
    skipped: list[dict] = field(default_factory=list)  # rows left out with skip_bad: line, path, reason

    def size(self, split: str) -> int:
        return len(self.labels[split])


def resolve_csv(root: str | Path, dataset: str = "auto", csv: str = "") -> Path:
    """The CSV of a data root: explicit name, else the preset's, else the one preset CSV present."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory")
    if csv:
        name = csv
    elif dataset != "auto":
        name = PRESET_CSV[dataset]
    else:
        present = [n for n in PRESET_CSV.values() if (root / n).is_file()]
        if len(present) != 1:
            found = ", ".join(present) or "none"
            raise DataError(f"{root}: cannot tell the data set; expected exactly one of "
                            f"{', '.join(PRESET_CSV.values())} (found {found}); pass dataset= or csv=")
        name = present[0]
    path = root / name
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    return path


def read_dir_table(root: str | Path, dataset: str = "auto", csv: str = "",
                   check_images: bool = True, threads: int = 8, skip_bad: bool = False,
                   progress: Mode = "off") -> DIRTable:
    """Read and check every row; bad rows raise DataError, or with skip_bad are left out and listed.
    `progress` shows the rows validated (their images decoded, the slow part)."""
    root = Path(root)
    csv_path = resolve_csv(root, dataset, csv)
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skip_blank_lines=False)  # line numbers stay true
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{csv_path}: cannot read CSV: {err}") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                        f"found {', '.join(frame.columns) or 'none'} (need age,path,split)")

    # Every problem of every row is collected first, so one run lists them all (by line).
    problems: list[tuple[int, str]] = []
    ages = np.full(len(frame), np.nan)
    for index, (age_text, path_text, split) in enumerate(zip(frame["age"], frame["path"], frame["split"])):
        age, reason = _parse_age(age_text)
        if reason:
            problems.append((index, f"field 'age': {age_text!r} {reason}"))
        if split not in SPLITS:
            problems.append((index, f"field 'split': {split!r} is not one of {', '.join(SPLITS)}"))
        if not path_text:
            problems.append((index, "field 'path' is empty"))
        ages[index] = age

    paths = [root / p for p in frame["path"]]
    if check_images:
        reasons = image_problems(paths, threads, progress)
        problems += [(i, f"field 'path': {reason}") for i, reason in enumerate(reasons) if reason and frame["path"][i]]
    problems.sort(key=lambda problem: problem[0])
    if problems and not skip_bad:
        listed = [f"{csv_path.name} line {i + 2} (path {frame['path'][i]!r}): {text}" for i, text in problems]
        shown = "\n  ".join(listed[:MAX_LISTED])
        more = f"\n  ... and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else ""
        raise DataError(f"{csv_path}: {len(listed)} problem(s):\n  {shown}{more}")
    skipped = [{"line": i + 2, "path": frame["path"][i], "reason": text} for i, text in problems]
    good = np.ones(len(frame), dtype=bool)
    good[[i for i, _ in problems]] = False

    splits = frame["split"].to_numpy()
    labels = {s: ages[good & (splits == s)] for s in SPLITS}
    split_paths = {s: [p for p, keep in zip(paths, good & (splits == s)) if keep] for s in SPLITS}
    for split in SPLITS:
        if len(labels[split]) == 0:
            raise DataError(f"{csv_path}: split {split!r} has no rows")
    return DIRTable(root, csv_path, labels, split_paths, skipped)


def image_problems(paths: list[Path], threads: int, progress: Mode) -> list[str | None]:
    """image_problem of each path, in order, `threads` images at a time."""
    reasons = []
    with ThreadPoolExecutor(threads) as pool, Progress(len(paths), "rows validated", progress) as validated:
        for reason in pool.map(image_problem, paths):
            reasons.append(reason)
            validated.update()
    return reasons


def image_problem(path: Path) -> str | None:
    """Why an image cannot be used (missing, unreadable, truncated, not an image), else None."""
    if not path.is_file():
        return "image file is missing"
    try:
        with Image.open(path) as image:
            image.load()  # a full decode catches truncated files that verify() lets through
    except Exception as err:  # PIL raises many types for bad files; all mean the same here
        return f"image cannot be decoded ({type(err).__name__}: {err})"
    return None


def _parse_age(text: str) -> tuple[float, str | None]:
    """The label and, if it cannot be used, why."""
    try:
        age = float(text)
    except ValueError:
        return math.nan, "is not a number"
    if not math.isfinite(age):
        return age, "is not a finite number"
    if age < 0:
        return age, "is negative"
    return age, None
