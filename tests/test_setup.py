"""`make setup` installs the whole design's stack once; later issues build on these imports."""

import importlib

import pytest


@pytest.mark.parametrize("module", ["ffcv.writer", "ffcv.loader", "ray.train.torch", "ray.tune", "mlflow",
                                    "optuna", "triton", "torchvision", "scipy", "matplotlib", "yaml", "tqdm"])
def test_design_dependencies_import(module):
    importlib.import_module(module)


def test_console_command_is_installed():
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).parent / "groupdir"  # the venv's bin, whether or not it is on PATH
    assert command.is_file(), f"no console script at {command}"
    usage = subprocess.run([str(command), "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in usage for name in ("synth", "train", "eval", "demo", "bench"))
