"""A synthetic face-age DIR data set in the field's layout (synth_age.csv + JPEGs).

Faces are drawn procedurally. Their look changes smoothly and monotonically with age: childhood
shapes (round face, big low-set eyes) fade by the twenties, then hair greys and recedes, wrinkles and
spots appear and the skin pales. Nuisance factors (position, scale, tilt, skin and hair colour,
background, lighting, noise, and a per-person "apparent age" offset of a few years) hide the age
signal, so nearby ages look alike as in real faces. Training ages are skewed like IMDB-WIKI-DIR
(dense in the 20s-40s, thin tails, a few ages almost empty); val and test are balanced per age up to
a cap.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from groupdir.atomic import atomic_folder, check_writable
from groupdir.config import PRESET_CSV
from groupdir.progress import Mode, Progress

MAX_AGE = 99


@dataclass
class SynthSpec:
    train: int = 6000       # training images
    eval_cap: int = 12      # val and test images per age, at most
    eval_min: int = 4       # ... and at least
    image_size: int = 64    # side of the written JPEGs
    image_size_max: int = 0  # if larger, each face gets a side drawn from [image_size, image_size_max]
    seed: int = 0
    jpeg_quality: int = 90


def train_age_weights(rng: np.random.Generator) -> np.ndarray:
    """Unnormalised probability of each age 0..99 in the training split."""
    ages = np.arange(MAX_AGE + 1)
    width = np.where(ages < 30, 9.0, 17.0)  # steep rise through the teens, long tail into old age
    weights = np.exp(-0.5 * ((ages - 30) / width) ** 2) + 0.006
    holes = rng.choice(np.r_[0:15, 70:MAX_AGE + 1], size=8, replace=False)  # nearly empty ages
    weights[holes] *= 0.05
    return weights


def sample_ages(spec: SynthSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    weights = train_age_weights(rng)
    probs = weights / weights.sum()
    train = rng.choice(MAX_AGE + 1, size=spec.train, p=probs)
    expected = probs * spec.train
    per_age = np.clip(np.round(expected), spec.eval_min, spec.eval_cap).astype(int)
    balanced = np.repeat(np.arange(MAX_AGE + 1), per_age)
    return {"train": np.sort(train), "val": balanced, "test": balanced.copy()}


def render_face(age: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """One face as uint8 (size, size, 3)."""
    age = float(np.clip(age + rng.normal(0, 2.5), 0, MAX_AGE + 3))  # apparent age differs from true age
    # Three cues that keep changing over the whole range, so no age band looks flat.
    growth = 1 - np.exp(-age / 9)                  # 0 at birth -> 1 by about 25
    aging = np.clip((age - 30) / 70, 0, 1)         # 0 until 30 -> 1 at 100
    linear = age / MAX_AGE

    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    tilt = rng.normal(0, 0.12)
    cx, cy = rng.normal(0, 0.07, size=2)
    scale = rng.uniform(0.82, 1.08)
    xr = np.cos(tilt) * (x - cx) + np.sin(tilt) * (y - cy)
    yr = -np.sin(tilt) * (x - cx) + np.cos(tilt) * (y - cy)
    height = 0.62 * scale
    width = height * (0.95 - 0.17 * growth + rng.normal(0, 0.03))   # round child face -> oval
    u, v = xr / width, yr / height

    background = rng.uniform(0.1, 0.9, size=3)
    gradient = rng.normal(0, 0.15, size=3)
    image = background[:, None, None] + gradient[:, None, None] * y[None]

    skin = np.array([0.93, 0.76, 0.62]) * rng.uniform(0.55, 1.05) + rng.normal(0, 0.03, size=3)
    skin = skin * (1 - 0.10 * linear) + 0.06 * aging                   # paler, duller with age
    face = _soft(1 - (u ** 2 + v ** 2), 0.08)

    # Hair: a cap over the top of the head; it greys, thins and recedes with age.
    hair_base = rng.choice([[0.10, 0.07, 0.05], [0.30, 0.18, 0.08], [0.55, 0.40, 0.20], [0.45, 0.15, 0.05]])
    grey = np.clip((age - 25) / 75 + rng.normal(0, 0.08), 0, 1)
    hair_colour = (1 - grey) * np.array(hair_base) + grey * np.array([0.78, 0.78, 0.80])
    hairline = -0.35 - 0.45 * aging * rng.uniform(0.2, 1.0)            # recedes towards the crown
    hair_shell = _soft(1 - (xr ** 2 / (1.12 * width) ** 2 + (yr + 0.05) ** 2 / (1.1 * height) ** 2), 0.08)
    hair = hair_shell * _soft(hairline - v, 0.1) * (1 - 0.35 * aging)

    # Wrinkles: horizontal ripples on the forehead and beside the eyes, deeper with age.
    ripple = 0.5 + 0.5 * np.sin(v * 28 + rng.uniform(0, 6.3))
    wrinkle_zone = _soft(-0.2 - v, 0.1) + 0.6 * _soft(np.abs(u) - 0.55, 0.08) * _soft(0.25 - np.abs(v), 0.1)
    wrinkles = np.clip((age - 25) / 75, 0, 1) * 0.4 * ripple * wrinkle_zone
    spots = (rng.random((size, size)) < 0.02 * aging) * 0.3

    shade = 1 - wrinkles - spots
    image = image * (1 - face) + face * skin[:, None, None] * shade[None]
    image = image * (1 - hair[None]) + hair[None] * hair_colour[:, None, None]

    # Eyes: big and set low in a child's face, smaller and higher in an adult's.
    eye_y = 0.18 - 0.28 * growth
    eye_radius = 0.17 - 0.06 * growth
    for side in (-1, 1):
        eye = _soft(1 - ((u - side * 0.38) ** 2 + (v - eye_y) ** 2 / 0.8) / eye_radius ** 2, 0.25)
        image = image * (1 - eye[None]) + eye[None] * np.array([0.08, 0.06, 0.05])[:, None, None]
    mouth_width = 0.30 + 0.10 * growth
    mouth = _soft(1 - (u / mouth_width) ** 2 - ((v - 0.55 + 0.05 * growth) / 0.05) ** 2, 0.2)
    image = image * (1 - mouth[None]) + mouth[None] * np.array([0.55, 0.25, 0.25])[:, None, None]

    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.35) * (np.cos(angle) * x + np.sin(angle) * y)
    image = image * light[None] * rng.uniform(0.75, 1.2)
    image = image + rng.normal(0, rng.uniform(0.01, 0.06), size=image.shape)
    return (np.clip(image, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)


def _soft(signed: np.ndarray, sharpness: float) -> np.ndarray:
    """A soft 0/1 mask: 1 where `signed` > 0, blurred over about `sharpness`."""
    return 1 / (1 + np.exp(-np.clip(signed / sharpness, -30, 30)))


def write_synth(out: str | Path, spec: SynthSpec, force: bool = False, progress: Mode = "off") -> Path:
    """Write OUT/synth_age.csv and OUT/images/<split>/*.jpg, showing the images written as
    `progress` says; return the CSV path.

    Everything goes into a temporary folder beside OUT that is renamed when complete, so an
    interrupted run leaves no half-written data set; an existing OUT is replaced only with force.
    """
    out = Path(out).resolve()
    check_writable(out, atomically=True)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    with atomic_folder(out) as tmp:
        _write_files(tmp, spec, progress)
    return out / PRESET_CSV["synth"]


def _write_files(folder: Path, spec: SynthSpec, progress: Mode) -> None:
    ages = sample_ages(spec)
    rows = []
    with Progress(sum(map(len, ages.values())), "images written", progress) as written:
        for split_index, (split, split_ages) in enumerate(ages.items()):
            (folder / "images" / split).mkdir(parents=True)
            for index, age in enumerate(split_ages):
                rows.append(_write_face(folder, spec, split, split_index, index, age))
                written.update()
    with open(folder / PRESET_CSV["synth"], "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["age", "path", "split"])
        writer.writerows(rows)


def _write_face(folder: Path, spec: SynthSpec, split: str, split_index: int, index: int, age: int) -> tuple:
    """The index-th face of a split as a JPEG; its CSV row (age, path, split)."""
    rng = np.random.default_rng([spec.seed, split_index, index])
    relative = f"images/{split}/{index:06d}_{age:02d}.jpg"
    size = int(rng.integers(spec.image_size, spec.image_size_max + 1)) if spec.image_size_max > spec.image_size \
        else spec.image_size
    Image.fromarray(render_face(age, rng, size)).save(folder / relative, quality=spec.jpeg_quality)
    return int(age), relative, split
