"""Run by tests/kernels/test_contrastive_kernel.py in a subprocess: TRITON_INTERPRET=1 must be set
before Triton is imported and stay set, which must not leak into the rest of the test session.
Prints one JSON object with the measured differences."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from groupdir.kernels.check import kernel_cases  # noqa: E402

def training_steps() -> dict:
    """Five optimizer steps of the real train_step on a small model, triton vs torch backend. SGD:
    Adam divides by the root of tiny second moments, which turns float32 rounding differences of
    1e-7 into visible ones within a few steps, whatever the backend."""
    from groupdir.config import load_config
    from groupdir.model import DIRNet
    from groupdir.methods import get_method
    from groupdir.recipe import supervision, train_step

    losses = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = load_config(overrides={"loss_backend": backend, "num_groups": 4, "batch_size": 16})
        net = DIRNet("resnet18", 4)
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        labels = torch.randint(0, 40, (16,), generator=generator).double()
        targets = supervision(cfg, labels.numpy())
        images = torch.randint(0, 255, (16, 3, 16, 16), generator=generator, dtype=torch.uint8)
        losses[backend] = [train_step(cfg, get_method(cfg.method), net, optimizer, images, labels, targets, torch.device("cpu"))
                           for _ in range(5)]
    return losses


if __name__ == "__main__":
    print(json.dumps({"kernel": kernel_cases, "training": training_steps}[sys.argv[1]]()))
