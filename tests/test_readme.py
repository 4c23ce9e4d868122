"""The README's Python example runs as written, on a checkpoint in `groupdir eval`'s format."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from groupdir import checkpoint
from groupdir.checkpoint import TrainState
from groupdir.config import load_config
from groupdir.data.shards import shard_labels
from groupdir.evaluation import Calibration
from groupdir.grouping import make_grouping
from groupdir.model import DIRNet

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # FFCV JIT-compiles the test split's loader
def test_the_readme_python_example_runs(shards, tmp_path, monkeypatch):
    # What `make demo` leaves behind: demo/shards and a run folder's checkpoint (here an untrained model).
    (tmp_path / "demo" / "groupdir").mkdir(parents=True)
    (tmp_path / "demo" / "shards").symlink_to(shards)
    cfg = load_config("demo", {"data": str(shards), "num_groups": 5})
    train_labels = shard_labels(shards, "train")
    grouping = make_grouping(train_labels, cfg.num_groups)
    torch.manual_seed(0)
    state = TrainState(best_model=DIRNet(cfg.backbone, cfg.num_groups).state_dict(),
                       best_calibration=Calibration(shift=(0.0,) * cfg.num_groups,
                                                    selected_route="adjusted").to_dict())
    torch.save(checkpoint.best_model_file(state, cfg, grouping.edges, train_labels),
               tmp_path / "demo" / "groupdir" / "checkpoint.pt")

    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["ages"].shape == (4,) and torch.isfinite(namespace["ages"]).all()
    assert namespace["results"]["selected_route"] == "adjusted"
    assert namespace["features"].grad is not None and np.isfinite(namespace["metrics"]["bmae/all"])
