"""The collectives the training loop needs, each a no-op in a single process.

`global_batch` is what makes contrast_scope=global possible: every worker gathers all workers'
features (with autograd: gradients flow back to the worker that produced them) and labels or groups,
so a batch-defined loss (the O(B^2) contrastive losses, RankSim, ConR) sees the global batch;
`gather` collects a tensor without gradient (the labels Balanced MSE's BMC scores against). Its backward SUMS the gradient each worker computes
for a piece (every worker computes the same global loss), so a worker's features receive
world_size x dL/dz; DDP then averages parameter gradients over the workers, which makes the
parameter gradient exactly that of the global loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_batch(features: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every worker's features (with gradient) and `others` (labels, groups: without), each
    concatenated in rank order; workers' batches are equal-sized."""
    _, world_size = world()
    if world_size == 1:
        return (features, *others)
    return (_GatherWithGrad.apply(features), *(gather(tensor) for tensor in others))


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every worker's `tensor` concatenated in rank order, without gradient."""
    _, world_size = world()
    if world_size == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(pieces, tensor.contiguous())
    return torch.cat(pieces)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each worker the summed gradient of its own piece."""

    @staticmethod
    def forward(ctx, piece: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        pieces = [torch.empty_like(piece) for _ in range(world_size)]
        dist.all_gather(pieces, piece.contiguous())
        ctx.rows = slice(rank * len(piece), (rank + 1) * len(piece))
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # all_reduce + slice: works on gloo and NCCL alike
        return grad[ctx.rows]


def mean_over_workers(values: torch.Tensor) -> torch.Tensor:
    """The mean of a small tensor over the workers (a NaN on one worker makes it NaN on every worker,
    so all of them stop at the same step)."""
    _, world_size = world()
    if world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size


def sum_over_workers(values: torch.Tensor) -> None:
    """Sums `values` over the workers, in place (FDS's per-bin feature sums)."""
    _, world_size = world()
    if world_size > 1:
        dist.all_reduce(values)


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics on every worker. DDP broadcasts buffers at the start of each
    training forward, so after the last step the workers' statistics differ; evaluation must use one
    model (the one the checkpoint saves)."""
    _, world_size = world()
    if world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_rows(arrays: dict[str, np.ndarray], rows: np.ndarray, root_only: bool = False) -> dict[str, np.ndarray] | None:
    """Each worker's per-sample arrays, gathered and de-duplicated by data-set row, in row order.
    Samplers pad the last worker's slice with repeated rows; evaluation must count each row once.
    `root_only`: gathered on rank 0 alone (large arrays); the other ranks get None."""
    rank, world_size = world()
    if world_size > 1:
        pieces: list | None = [None] * world_size if rank == 0 or not root_only else None
        if root_only:
            dist.gather_object((arrays, rows), pieces, dst=0)
        else:
            dist.all_gather_object(pieces, (arrays, rows))
        if pieces is None:
            return None
        arrays = {key: np.concatenate([piece[0][key] for piece in pieces]) for key in arrays}
        rows = np.concatenate([piece[1] for piece in pieces])
    _, first = np.unique(rows, return_index=True)
    return {key: value[first] for key, value in arrays.items()}


def gather_objects(value) -> list:
    """One small picklable value from every worker, in rank order."""
    _, world_size = world()
    if world_size == 1:
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value)
    return values
