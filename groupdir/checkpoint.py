"""One checkpoint format: the training state of a run, and the best model in it.

Every epoch ends with a Ray checkpoint (a folder) holding
- `train_state.pt`: the model, optimizer, epoch, step, history and best score, to go on after a crash;
- `checkpoint.pt`: the best-on-validation model with its calibration, config and group edges: the
  file `groupdir eval` and `load_model` read, copied to the run folder at the end;
- `history.json`, and at the end `results.json` (the test evaluation), the test plots (`plots/`)
  and the per-step metrics rank 0 could not send to MLflow (`unsent_steps.json`);
- or only `stopped.json`: the run stopped for good (a NaN loss), with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groupdir import __version__
from groupdir.errors import TrainingError

CHECKPOINT = "checkpoint.pt"
STATE = "train_state.pt"
HISTORY = "history.json"
RESULTS = "results.json"
STOPPED = "stopped.json"
PLOTS = "plots"
UNSENT_STEPS = "unsent_steps.json"


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
    """A `checkpoint.pt` (the best model, its calibration and config); a clear error otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} not found") from None
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise TrainingError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from err


def encoder_weights(path: str | Path, backbone: str) -> dict[str, torch.Tensor]:
    """The encoder's weights in a `checkpoint.pt` (for init_from), refused with the file's name when
    it holds no groupdir model or another backbone."""
    saved = load(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict) or "config" not in saved:
        raise TrainingError(f"init_from={path} is not a groupdir checkpoint.pt (no model and config in it)")
    trained_on = saved["config"].get("backbone")
    if trained_on != backbone:
        raise TrainingError(f"init_from={path} holds a {trained_on} encoder; this run's backbone is {backbone}")
    prefix = "encoder."
    return {key[len(prefix):]: value for key, value in saved["model"].items() if key.startswith(prefix)}


def load_encoder(net, path: str | Path, backbone: str) -> None:
    """Starts `net`'s encoder from the checkpoint's; the heads keep their fresh initialisation."""
    net.encoder.load_state_dict(encoder_weights(path, backbone))


def temporary_folder():
    return tempfile.TemporaryDirectory(prefix="groupdir-ckpt-")
