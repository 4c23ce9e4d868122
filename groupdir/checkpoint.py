"""One checkpoint format: the training state of a run, and the best model in it.

Every epoch ends with a Ray checkpoint (a folder) holding
- `train_state.pt`: the model, optimizer, epoch, step, history and best score, to go on after a crash;
- `checkpoint.pt`: the best-on-validation model with its calibration, config and group edges: the
  file `groupdir eval` and `load_model` read, copied to the run folder at the end;
- `history.json`, and at the end `results.json` (the test evaluation), the test plots (`plots/`)
  and the per-step metrics rank 0 could not send to MLflow (`unsent_steps.json`);
- or only `stopped.json`: the run stopped for good (a NaN loss), with the reason.

Every reader of a `checkpoint.pt` (eval, load_model, init_from, a restarted run) goes through `load`,
which refuses a missing, truncated, foreign or corrupt file with a message naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groupdir import __version__
from groupdir.errors import CheckpointError, ConfigError

CHECKPOINT = "checkpoint.pt"
STATE = "train_state.pt"
HISTORY = "history.json"
RESULTS = "results.json"
STOPPED = "stopped.json"
PLOTS = "plots"
UNSENT_STEPS = "unsent_steps.json"
FORMAT = ("model", "config", "group_edges", "train_labels")  # in every checkpoint.pt (load_model also needs "calibration")
LABEL_ALLOWANCE = 0.25  # how far beyond a checkpoint's label range eval data may go, as a share of it


@dataclasses.dataclass
class TrainState:
    """What a worker carries from epoch to epoch, and what a restart restores."""
    epoch: int = 0                 # epochs done
    step: int = 0                  # optimizer steps done
    history: list[dict] = dataclasses.field(default_factory=list)  # one record per epoch
    best_value: float = math.inf   # the best validation select_metric so far
    best_epoch: int = 0
    best_val: dict = dataclasses.field(default_factory=dict)          # its validation metrics
    best_model: dict = dataclasses.field(default_factory=dict)        # its weights, on the CPU
    best_calibration: dict = dataclasses.field(default_factory=dict)  # its routes' calibration
    results: dict | None = None    # the test evaluation, once done
    stopped: str = ""              # why the run stopped for good ("" while it goes on)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds by phase, rank 0's


def best_model_file(state: TrainState, cfg, edges, train_labels) -> dict[str, Any]:
    """The best model in `groupdir eval`'s format."""
    return {"model": state.best_model, "calibration": state.best_calibration, "config": cfg.to_dict(),
            "group_edges": list(edges), "train_labels": torch.as_tensor(np.asarray(train_labels), dtype=torch.float64),
            "epoch": state.best_epoch, "val": state.best_val, "version": __version__}


def write(folder: Path, state: TrainState, net=None, optimizer=None, best: dict | None = None,
          files: dict[str, bytes] | None = None) -> None:
    """The checkpoint folder of `state` (see the module docstring), with `files` (path: bytes)."""
    if state.stopped:
        (folder / STOPPED).write_text(json.dumps({"message": state.stopped}))
        return
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": state.epoch,
                "step": state.step, "history": state.history, "best_value": state.best_value,
                "best_epoch": state.best_epoch, "timings": state.timings}, folder / STATE)
    torch.save(best, folder / CHECKPOINT)
    (folder / HISTORY).write_text(json.dumps(state.history))
    if state.results is not None:
        (folder / RESULTS).write_text(json.dumps(state.results))
    for path, content in (files or {}).items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)


def restore(folder: Path, net, optimizer) -> TrainState:
    """The state saved in a checkpoint folder, with the model and optimizer loaded."""
    if (folder / STOPPED).exists():
        return TrainState(stopped=json.loads((folder / STOPPED).read_text())["message"])
    saved = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    best = load(folder / CHECKPOINT)
    net.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(epoch=saved["epoch"], step=saved["step"], history=saved["history"],
                      best_value=saved["best_value"], best_epoch=saved["best_epoch"], best_val=best["val"],
                      best_model=best["model"], best_calibration=best["calibration"],
                      timings=saved.get("timings", {}))


def load(path: str | Path) -> dict:
    """A `checkpoint.pt` (the best model, its calibration and config), checked whole: a missing,
    truncated or foreign file, or one whose group edges do not fit its own config, is refused with
    a message naming the file and what is wrong. `groupdir eval`, `load_model`, init_from and a
    restarted run all read checkpoints through here."""
    path = Path(path)
    saved = read_torch_file(path)
    missing = [key for key in FORMAT if key not in saved] if isinstance(saved, dict) else list(FORMAT)
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a groupdir checkpoint.pt: it has no {', '.join(missing)} "
                              f"({described(saved)})")
    cfg = saved_config(path, saved)
    groups = len(saved["group_edges"]) - 1
    if groups != cfg.num_groups:
        raise CheckpointError(f"checkpoint {path} is corrupt: its config has num_groups={cfg.num_groups}, "
                              f"its group_edges cut {groups} group(s)")
    return saved


def read_torch_file(path: Path):
    """What torch.load gives (tensors and plain containers only), or a clear error naming the file."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the {CHECKPOINT} file in it")
    # torch.save writes a zip archive whose directory is at its end: a cut-off copy has none.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch file (not the complete "
                              f"zip archive torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only: tensors and plain containers, no code to run
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain containers"
                              f"{f' ({refused.group(1)})' if refused else ''}, which groupdir does not "
                              f"unpickle: not a groupdir checkpoint.pt") from None
    except Exception as err:  # torch raises several types; a traceback would not say which file
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: "
                              f"{first_line(err)}") from None


def saved_config(path: Path, saved: dict):
    """The checkpoint's config as a Config; one this version cannot read is refused naming the file."""
    from groupdir.config import build

    try:
        return build(saved["config"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} holds a config this groupdir {__version__} cannot "
                              f"use: {err}") from None


def load_weights(module: torch.nn.Module, weights: dict, path: str | Path, part: str) -> None:
    """`module.load_state_dict(weights)`, refused naming the file when they do not fit (another
    architecture, a head of another size) rather than with torch's page of key names."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: its {part} weights do not fit: {first_line(err)}") from None


def check_labels_fit(path: str | Path, saved: dict, labels, source: str) -> None:
    """Refuses data whose labels lie far outside the range the checkpoint's groups cover: another
    data set, or labels on another scale. Labels a little beyond it are the DIR norm, not a
    mismatch: a balanced test split covers the whole label range, including the ages the skewed
    training split lacks at its ends (the tests' small synthetic set: training ages 5-94, test ages
    0-99), and the first and last groups are open-ended for them. So up to LABEL_ALLOWANCE of the range beyond
    either end is accepted."""
    labels = np.asarray(labels, dtype=np.float64)
    edges = saved["group_edges"]
    low, high = float(edges[0]), float(edges[-1])
    allowance = LABEL_ALLOWANCE * (high - low)
    if len(labels) and (labels.min() < low - allowance or labels.max() > high + allowance):
        raise CheckpointError(
            f"checkpoint {path} was trained for labels {low:g} to {high:g} ({len(edges) - 1} groups); "
            f"{source} has labels {labels.min():g} to {labels.max():g}, more than "
            f"{LABEL_ALLOWANCE:.0%} of that range beyond it: is it the data set the checkpoint was trained on?")


def encoder_weights(path: str | Path, backbone: str) -> dict[str, torch.Tensor]:
    """The encoder's weights in a `checkpoint.pt` (for init_from). Only the encoder is taken, so
    only its architecture has to match: another backbone is refused. The checkpoint's heads, group
    count, label range and image size do not matter (the run's heads start fresh, and the
    convolutional encoder with global pooling runs at any input size)."""
    saved = load(path)
    trained_on = saved["config"].get("backbone")
    if trained_on != backbone:
        raise CheckpointError(f"init_from={path} holds a {trained_on} encoder; this run's backbone is {backbone}")
    prefix = "encoder."
    return {key[len(prefix):]: value for key, value in saved["model"].items() if key.startswith(prefix)}


def load_encoder(net, path: str | Path, backbone: str) -> None:
    """Starts `net`'s encoder from the checkpoint's; the heads keep their fresh initialisation."""
    load_weights(net.encoder, encoder_weights(path, backbone), path, "encoder")


def first_line(err: Exception) -> str:
    """The gist of a library's error: torch puts a heading first and pages of key names after it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    gist = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return gist if len(gist) <= 300 else gist[:297] + "..."


def described(saved) -> str:
    """What a foreign file holds instead: its type, and a few of its keys."""
    keys = [str(key) for key in saved] if isinstance(saved, dict) else []
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"found: {type(saved).__name__}" + (f" with keys {', '.join(keys[:5])}{more}" if keys else "")


def temporary_folder():
    return tempfile.TemporaryDirectory(prefix="groupdir-ckpt-")
