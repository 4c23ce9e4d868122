"""Run by tests/kernels/test_contrastive_kernel.py in a subprocess: TRITON_INTERPRET=1 must be set
before Triton is imported and stay set, which must not leak into the rest of the test session.
Prints one JSON object with the measured differences."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from groupdir.config import PRECISIONS  # noqa: E402
from groupdir.kernels.check import kernel_cases  # noqa: E402
from groupdir.losses import group_contrastive_loss  # noqa: E402


def round_dot_inputs_as_a_gpu():
    """Patch the interpreter's tl.dot to round its inputs the way the precision asks. As shipped it
    ignores input_precision (tf32 gives ieee's bits) and multiplies bfloat16 operands as their uint16
    bit patterns (triton-lang/triton#11584: "we just don't support it yet"), so neither reduced
    precision could be checked on the CPU. Patched: bfloat16 operands by value (the interpreter's
    float32 -> bfloat16 cast truncates), tf32 operands truncated to tf32's 10-bit mantissa; both
    coarser than or equal to a GPU's rounding."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    interpreted_dot = interpreter.InterpreterBuilder.create_dot

    def as_rounded_float32(operand, input_precision):
        if operand.dtype.scalar == tl.bfloat16:  # stored as the upper half of a float32's bits
            return interpreter.TensorHandle((operand.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        if input_precision == ir.INPUT_PRECISION.TF32 and operand.dtype.scalar == tl.float32:
            truncated = operand.data.view(np.uint32) & np.uint32(0xFFFFE000)  # keep 10 of 23 mantissa bits
            return interpreter.TensorHandle(truncated.view(np.float32), tl.float32)
        return operand

    def create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        return interpreted_dot(self, as_rounded_float32(a, input_precision), as_rounded_float32(b, input_precision),
                               acc, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def kernels_at_each_precision() -> dict:
    round_dot_inputs_as_a_gpu()
    return {precision: kernel_cases("cpu", precision) for precision in PRECISIONS}


def custom_ops() -> dict:
    """torch.library.opcheck of both ops (the forward with the group count given and from the data),
    and a training step compiled with fullgraph=True (which raises on a graph break) against the same
    step in eager mode, with the graph breaks torch._dynamo.explain counts without fullgraph."""
    from groupdir.kernels.contrastive import group_contrast, group_contrast_backward

    generator = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(9, 5, generator=generator), dim=1).requires_grad_()
    groups = torch.tensor([0, 2, 1, 1, 0, 3, 2, 2, 0])
    _, row_max, cumulative = group_contrast(unit, groups, 4, 0.7, True, "ieee")
    opchecks = {f"forward, num_groups={num_groups}": torch.library.opcheck(
                    group_contrast, (unit, groups, num_groups, 0.7, True, "ieee")) for num_groups in (4, None)}
    opchecks["backward"] = torch.library.opcheck(
        group_contrast_backward, (unit.detach(), groups, row_max, cumulative, 0.7, True, "ieee"))

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 8)
    inputs, step_groups = torch.randn(12, 6, generator=generator), torch.randint(0, 4, (12,), generator=generator)

    def loss_of(inputs):
        return group_contrastive_loss(model(inputs), step_groups, 0.7, backend="triton", num_groups=4)

    def gradients(step):
        model.zero_grad()
        loss = step(inputs)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = gradients(loss_of)
    compiled_loss, compiled_grads = gradients(torch.compile(loss_of, fullgraph=True, backend="aot_eager"))
    try:
        group_contrastive_loss(model(inputs), step_groups, backend="triton", num_groups=2)
        out_of_range = "accepted"
    except ValueError as error:
        out_of_range = str(error)
    return {"opcheck": opchecks, "eager_loss": eager_loss, "compiled_loss": compiled_loss,
            "grad_difference": max(float((a - b).abs().max()) for a, b in zip(eager_grads, compiled_grads)),
            "graph_breaks": torch._dynamo.explain(loss_of)(inputs).graph_break_count,
            "grad_fn": type(loss_of(inputs).grad_fn).__name__, "groups_beyond_num_groups": out_of_range}


def training_steps() -> dict:
    """Five optimizer steps of the real train_step on a small model, triton vs torch backend. SGD:
    Adam divides by the root of tiny second moments, which turns float32 rounding differences of
    1e-7 into visible ones within a few steps, whatever the backend."""
    from groupdir.config import load_config
    from groupdir.recipe import local_worker, train_step

    losses = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = load_config(overrides={"loss_backend": backend, "num_groups": 4, "batch_size": 16, "optimizer": "sgd",
                                     "lr": 3e-3, "momentum": 0.0, "weight_decay": 0.0})
        generator = torch.Generator().manual_seed(1)
        labels = torch.randint(0, 40, (16,), generator=generator).double()
        worker = local_worker(cfg, labels.numpy())
        pixels = torch.randint(0, 255, (16, 3, 16, 16), generator=generator, dtype=torch.uint8)
        images = pixels.float() / 127.5 - 1.0  # as the loaders deliver them: Normalize(0.5, 0.5)
        losses[backend] = [train_step(worker, images, labels) for _ in range(5)]
    return losses


if __name__ == "__main__":
    checks = {"kernel": kernels_at_each_precision, "custom_ops": custom_ops, "training": training_steps}
    print(json.dumps(checks[sys.argv[1]]()))
