"""The Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess of its own)
against the naive B x B x B reference of Eq. 2 at each matmul precision, as torch custom ops under
torch.compile, and in a short training run against the torch path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groupdir.config import PRECISIONS
from groupdir.kernels.check import CASES
from groupdir.losses import group_contrastive_loss

CHECKS = Path(__file__).with_name("interpreted_checks.py")


def interpreted(what: str) -> dict:
    done = subprocess.run([sys.executable, str(CHECKS), what], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kernels_equal_the_naive_reference_in_value_and_gradient_at_each_precision():
    results = interpreted("kernel")
    assert list(results) == list(PRECISIONS)
    for precision, cases in results.items():
        assert list(cases) == list(CASES)
        for name, r in cases.items():
            # Within groupdir/kernels/check.py's TOLERANCE[precision]; tf32 and bf16 with the
            # interpreter's tl.dot rounding its inputs as a GPU would (interpreted_checks.py).
            assert r["ok"], (precision, name, r)
    for name, r in results["ieee"].items():
        assert r["loss"] == pytest.approx(r["reference"], rel=1e-5, abs=1e-6), name
    # The reduced precisions do round: not one of them reproduces ieee's gradients to the bit.
    for precision in ("tf32", "bf16"):
        assert results[precision]["odd batch"]["grad_error"] > 10 * results["ieee"]["odd batch"]["grad_error"]


@pytest.mark.slow
def test_the_custom_ops_pass_opcheck_and_compile_without_graph_breaks():
    r = interpreted("custom_ops")
    for op, tests in r["opcheck"].items():
        assert set(tests.values()) == {"SUCCESS"}, (op, tests)
    assert r["graph_breaks"] == 0
    assert r["compiled_loss"] == pytest.approx(r["eager_loss"], rel=1e-6)
    assert r["grad_difference"] < 1e-6
    assert "groupdir_group_contrast" in r["grad_fn"]  # the public loss goes through the registered op
    assert "out of range for num_groups=2" in r["groups_beyond_num_groups"]


@pytest.mark.slow
def test_a_training_run_with_the_triton_backend_follows_the_torch_backend():
    losses = interpreted("training")
    for torch_step, triton_step in zip(losses["torch"], losses["triton"]):
        for term in ("total", "reg", "cls", "grc"):
            assert triton_step[term] == pytest.approx(torch_step[term], rel=1e-4, abs=1e-5), term


def test_dispatch_picks_what_it_says():
    z, groups = torch.randn(6, 4, requires_grad=True), torch.tensor([0, 1, 1, 2, 0, 3])
    assert "group_contrast" not in type(group_contrastive_loss(z, groups, backend="auto").grad_fn).__name__  # CPU: torch
    assert "group_contrast" not in type(group_contrastive_loss(z, groups, backend="torch").grad_fn).__name__
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        group_contrastive_loss(z, groups, backend="triton")  # no interpreter in this process
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        group_contrastive_loss(z, groups, backend="tpu")
