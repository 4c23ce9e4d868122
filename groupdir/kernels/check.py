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
# Values: float32 accumulation against float64, for float32 and bfloat16 inputs alike (the reference
# sees the same rounded inputs). Gradients, relative to their largest entry: autograd hands a
# bfloat16 input its gradient in bfloat16 (8 bits of mantissa).
VALUE_TOLERANCE = 1e-5
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def value_and_grad(z: torch.Tensor, groups: torch.Tensor, backend: str, similarity: str):
    z = z.detach().clone().requires_grad_()
    loss = group_contrastive_loss(z, groups, temperature=0.7, similarity=similarity, backend=backend)
    loss.backward()
    return loss.detach().double(), z.grad.double()


def kernel_cases(device: str = "cpu") -> dict[str, dict]:
    """Each case: the Triton loss, the naive float64 loss, the largest gradient error and scale."""
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
        loss, grad = value_and_grad(z.to(device), groups.to(device), "triton", similarity)
        error = float((grad.cpu() - reference_grad).abs().max())
        scale = max(float(reference_grad.abs().max()), 1e-3)
        ok = (abs(float(loss) - float(reference_loss)) <= VALUE_TOLERANCE * max(1.0, abs(float(reference_loss)))
              and error <= GRAD_TOLERANCE[dtype] * scale)
        out[name] = {"loss": float(loss), "reference": float(reference_loss), "grad_error": error,
                     "grad_scale": scale, "dtype": str(dtype), "ok": ok}
    return out


def check_table(results: dict[str, dict]) -> str:
    from groupdir.tables import markdown_table

    rows = [[name, r["dtype"].removeprefix("torch."), f"{r['loss']:.7f}", f"{r['reference']:.7f}",
             f"{r['grad_error'] / r['grad_scale']:.1e}", "yes" if r["ok"] else "NO"] for name, r in results.items()]
    header = ["case", "input", "Triton loss", "naive float64 loss", "max gradient error / scale", "ok"]
    return "\n".join(markdown_table(header, rows, text_columns=2)) + "\n"
