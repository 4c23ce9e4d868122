"""The Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess of its own)
against the naive B x B x B reference of Eq. 2, and in a short training run against the torch path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groupdir.losses import group_contrastive_loss

CHECKS = Path(__file__).with_name("interpreted_checks.py")


def interpreted(what: str) -> dict:
    done = subprocess.run([sys.executable, str(CHECKS), what], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kernels_equal_the_naive_reference_in_value_and_gradient():
    results = interpreted("kernel")
    assert len(results) == 9
    for name, r in results.items():
        # Tolerances (groupdir/kernels/check.py): values 1e-5 relative; gradients 1e-5 of their
        # largest entry for float32 inputs, 1e-2 for bfloat16 (autograd returns them in bfloat16).
        assert r["ok"], (name, r)
        assert r["loss"] == pytest.approx(r["reference"], rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_a_training_run_with_the_triton_backend_follows_the_torch_backend():
    losses = interpreted("training")
    for torch_step, triton_step in zip(losses["torch"], losses["triton"]):
        for term in ("total", "reg", "cls", "grc"):
            assert triton_step[term] == pytest.approx(torch_step[term], rel=1e-4, abs=1e-5), term


def test_dispatch_picks_what_it_says():
    z, groups = torch.randn(6, 4, requires_grad=True), torch.tensor([0, 1, 1, 2, 0, 3])
    assert "Triton" not in type(group_contrastive_loss(z, groups, backend="auto").grad_fn).__name__  # CPU: torch
    assert "Triton" not in type(group_contrastive_loss(z, groups, backend="torch").grad_fn).__name__
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        group_contrastive_loss(z, groups, backend="triton")  # no interpreter in this process
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        group_contrastive_loss(z, groups, backend="tpu")
