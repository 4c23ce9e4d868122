"""The kernels against the naive B x B x B reference of Eq. 2, in value and gradient, on a device.
Used by the tests (CPU, under TRITON_INTERPRET=1) and by `groupdir bench loss` on a GPU."""

from __future__ import annotations

import torch

from groupdir.losses import group_contrastive_loss

CASES = {  # name: (B, D, G, similarity, input dtype, tie some features?)
    "odd batch": (37, 20, 5, "cosine", torch.float32, False),
    "B = 2": (2, 8, 2, "cosine", torch.float32, False),
    "ties": (40, 16, 3, "cosine", torch.float32, True),
    "one group": (33, 16, 1, "cosine", torch.float32, False),
    "G = 256": (70, 12, 256, "cosine", torch.float32, False),
    "D = 2048": (6, 2048, 4, "cosine", torch.float32, False),
    "euclidean": (50, 40, 7, "euclidean", torch.float32, False),
    "bfloat16": (45, 24, 6, "cosine", torch.bfloat16, False),
    "bfloat16 euclidean": (45, 24, 6, "euclidean", torch.bfloat16, False),
}
# Tolerances against float64, by the kernels' matmul precision: (loss, relative; gradient, relative
# to its largest entry, at least 1e-3). ieee: float32 accumulation, whatever the input dtype (the
# reference sees the same rounded inputs); measured 8e-8 and 4e-7. tf32 and bf16: about 4x the largest
# errors over CASES under the interpreter with its tl.dot rounding the inputs by truncation
# (tests/kernels/interpreted_checks.py; the interpreter itself ignores input_precision and cannot
# multiply bfloat16): tf32 4.5e-5 and 2.4e-3, bf16 3.6e-4 and 1.2e-2. A GPU rounds to bfloat16 to
# nearest (half the truncation error); its errors at either precision are unmeasured.
TOLERANCE = {"ieee": (1e-5, 1e-5), "tf32": (2e-4, 1e-2), "bf16": (2e-3, 5e-2)}
# Autograd hands a bfloat16 input its gradient in bfloat16 (8 bits of mantissa), whatever the precision.
BFLOAT16_GRAD_TOLERANCE = 1e-2


def value_and_grad(z: torch.Tensor, groups: torch.Tensor, backend: str, similarity: str,
                   precision: str = "ieee"):
    z = z.detach().clone().requires_grad_()
    loss = group_contrastive_loss(z, groups, temperature=0.7, similarity=similarity, backend=backend,
                                  precision=precision)
    loss.backward()
    return loss.detach().double(), z.grad.double()


def kernel_cases(device: str = "cpu", precision: str = "ieee") -> dict[str, dict]:
    """Each case at one precision: the Triton loss, the naive float64 loss, the largest gradient error
    and scale, and whether both are within TOLERANCE[precision]."""
    value_tolerance, grad_tolerance = TOLERANCE[precision]
    out = {}
    for name, (batch, dim, num_groups, similarity, dtype, tied) in CASES.items():
        generator = torch.Generator().manual_seed(len(name))
        z = torch.randn(batch, dim, generator=generator).to(dtype)
        groups = torch.randint(0, num_groups, (batch,), generator=generator)
        if tied:
            z[5:10] = z[4]
        if num_groups == 256:
            groups[:2] = torch.tensor([0, 255])  # the whole range
        reference_loss, reference_grad = value_and_grad(z.double(), groups, "naive", similarity)
        loss, grad = value_and_grad(z.to(device), groups.to(device), "triton", similarity, precision)
        error = float((grad.cpu() - reference_grad).abs().max())
        scale = max(float(reference_grad.abs().max()), 1e-3)
        case_grad_tolerance = max(grad_tolerance, BFLOAT16_GRAD_TOLERANCE if dtype == torch.bfloat16 else 0.0)
        ok = (abs(float(loss) - float(reference_loss)) <= value_tolerance * max(1.0, abs(float(reference_loss)))
              and error <= case_grad_tolerance * scale)
        out[name] = {"loss": float(loss), "reference": float(reference_loss), "grad_error": error,
                     "grad_scale": scale, "dtype": str(dtype), "ok": ok}
    return out


def check_table(by_precision: dict[str, dict[str, dict]]) -> str:
    """One row per precision and case, from {precision: kernel_cases(device, precision)}."""
    from groupdir.tables import markdown_table

    rows = [[precision, name, r["dtype"].removeprefix("torch."), f"{r['loss']:.7f}", f"{r['reference']:.7f}",
             f"{r['grad_error'] / r['grad_scale']:.1e}", "yes" if r["ok"] else "NO"]
            for precision, results in by_precision.items() for name, r in results.items()]
    header = ["precision", "case", "input", "Triton loss", "naive float64 loss", "max gradient error / scale", "ok"]
    return "\n".join(markdown_table(header, rows, text_columns=3)) + "\n"
