"""Fused Triton kernels for the ordinal group contrastive loss (paper Eq. 2), with no B x B matrix
in memory.

Forward, one program per block of anchors (flash-attention style): walk the column blocks, compute
the similarity tile from the features, keep an online row maximum m_i, the sum of the anchor's
logits, and P_i[g] = sum over columns k of group g of exp(l_ik - m_i) (a tile's contribution is
one matmul with the columns' one-hot groups). Only these per-anchor statistics leave the kernel;
the histogram by group DISTANCE, H_i[d] = P_i[g_i + d] + P_i[g_i - d], its suffix sums and the loss
are O(B G) and done in torch.

Backward recomputes the tiles: dL/ds_ik = -(1 - e_ik C_i[d_ik]) / (t B (B-1)) (DESIGN.md), and
dz_i = sum_k (dL/ds_ik + dL/ds_ki) z_k, the first sum over column blocks by row blocks, the second
in a separate pass over row blocks by column blocks (no atomics). The L2 normalisation's gradient is
left to autograd around the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 32      # anchors and columns per tile (tl.dot needs >= 16)
BLOCK_D = 32    # feature chunk of the similarity dot
EPSILON = 1e-12  # as the torch path: ||a - b||^2 is clamped here before the square root


@triton.jit
def _logits_tile(z_ptr, rows, cols, batch, dim, stride, inv_t, EUCLIDEAN: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK, BLOCK) similarity / t of rows x cols, and d(similarity)/d(dot) for the chain rule."""
    dot = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        zi = tl.load(z_ptr + rows[:, None] * stride + feats[None, :],
                     mask=(rows[:, None] < batch) & (feats[None, :] < dim), other=0.0)
        zk = tl.load(z_ptr + cols[:, None] * stride + feats[None, :],
                     mask=(cols[:, None] < batch) & (feats[None, :] < dim), other=0.0)
        dot += tl.dot(zi, tl.trans(zk), input_precision="ieee")
    if EUCLIDEAN:
        squared = 2.0 - 2.0 * dot
        clamped = tl.maximum(squared, EPSILON)
        distance = tl.sqrt(clamped)
        similarity = -distance
        slope = tl.where(squared > EPSILON, 1.0 / distance, 0.0)
    else:
        similarity = dot
        slope = tl.full(dot.shape, 1.0, tl.float32)
    return similarity * inv_t, slope


@triton.jit
def _forward_kernel(z_ptr, group_ptr, max_ptr, sum_ptr, hist_ptr, batch, dim, stride, inv_t,
                    NUM_GROUPS: tl.constexpr, EUCLIDEAN: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bins = tl.arange(0, NUM_GROUPS)
    row_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    logit_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    hist = tl.zeros((BLOCK, NUM_GROUPS), dtype=tl.float32)
    for c0 in range(0, batch, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        logits, _ = _logits_tile(z_ptr, rows, cols, batch, dim, stride, inv_t, EUCLIDEAN, BLOCK_D)
        valid = (rows[:, None] < batch) & (cols[None, :] < batch) & (rows[:, None] != cols[None, :])
        logit_sum += tl.sum(tl.where(valid, logits, 0.0), axis=1)
        new_max = tl.maximum(row_max, tl.max(tl.where(valid, logits, float("-inf")), axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.where(row_max == float("-inf"), 0.0, tl.exp(row_max - safe_max))
        exps = tl.where(valid, tl.exp(logits - safe_max[:, None]), 0.0)
        col_groups = tl.load(group_ptr + cols, mask=cols < batch, other=-1)
        one_hot = (col_groups[:, None] == bins[None, :]).to(tl.float32)
        hist = hist * rescale[:, None] + tl.dot(exps, one_hot, input_precision="ieee")
        row_max = new_max
    in_batch = rows < batch
    tl.store(max_ptr + rows, row_max, mask=in_batch)
    tl.store(sum_ptr + rows, logit_sum, mask=in_batch)
    tl.store(hist_ptr + rows[:, None] * NUM_GROUPS + bins[None, :], hist, mask=in_batch[:, None])


@triton.jit
def _grad_tile(z_ptr, group_ptr, max_ptr, cum_ptr, rows, cols, batch, dim, stride, inv_t, scale,
               NUM_GROUPS: tl.constexpr, EUCLIDEAN: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/d(dot_ik) for a tile: -(1 - e_ik C_i[d_ik]) * scale * slope, zero off the valid pairs."""
    logits, slope = _logits_tile(z_ptr, rows, cols, batch, dim, stride, inv_t, EUCLIDEAN, BLOCK_D)
    valid = (rows[:, None] < batch) & (cols[None, :] < batch) & (rows[:, None] != cols[None, :])
    row_max = tl.load(max_ptr + rows, mask=rows < batch, other=0.0)
    row_groups = tl.load(group_ptr + rows, mask=rows < batch, other=0)
    col_groups = tl.load(group_ptr + cols, mask=cols < batch, other=0)
    distance = tl.abs(row_groups[:, None] - col_groups[None, :])
    cum = tl.load(cum_ptr + rows[:, None] * NUM_GROUPS + distance, mask=valid, other=0.0)
    exps = tl.exp(tl.where(valid, logits - row_max[:, None], 0.0))
    return tl.where(valid, -(1.0 - exps * cum) * scale * slope, 0.0)


@triton.jit
def _backward_kernel(z_ptr, group_ptr, max_ptr, cum_ptr, grad_ptr, batch, dim, stride, inv_t, scale,
                     COLUMNS: tl.constexpr, NUM_GROUPS: tl.constexpr, EUCLIDEAN: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One side of dz for a block of samples and a feature chunk: as anchors, sum_k G_ik z_k
    (COLUMNS=False); as columns, sum_i G_ik z_i (COLUMNS=True). Two launches, no atomics."""
    mine = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    feats = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    for o0 in range(0, batch, BLOCK):
        others = o0 + tl.arange(0, BLOCK)
        if COLUMNS:
            grad = tl.trans(_grad_tile(z_ptr, group_ptr, max_ptr, cum_ptr, others, mine, batch, dim, stride,
                                       inv_t, scale, NUM_GROUPS, EUCLIDEAN, BLOCK_D))
        else:
            grad = _grad_tile(z_ptr, group_ptr, max_ptr, cum_ptr, mine, others, batch, dim, stride,
                              inv_t, scale, NUM_GROUPS, EUCLIDEAN, BLOCK_D)
        z_others = tl.load(z_ptr + others[:, None] * stride + feats[None, :],
                           mask=(others[:, None] < batch) & (feats[None, :] < dim), other=0.0)
        acc += tl.dot(grad, z_others, input_precision="ieee")
    tl.store(grad_ptr + mine[:, None] * dim + feats[None, :], acc,
             mask=(mine[:, None] < batch) & (feats[None, :] < dim))


class TritonGroupContrast(torch.autograd.Function):
    """Loss of L2-normalised float32 features `unit` (B, D) and groups 0..G-1 (B,)."""

    @staticmethod
    def forward(ctx, unit: torch.Tensor, groups: torch.Tensor, temperature: float, euclidean: bool):
        unit = unit.contiguous()
        batch, dim = unit.shape
        num_groups = max(16, triton.next_power_of_2(int(groups.max()) + 1))
        groups = groups.to(torch.int32).contiguous()
        row_max = unit.new_empty(batch)
        logit_sum = unit.new_empty(batch)
        hist = unit.new_empty(batch, num_groups)
        _forward_kernel[(triton.cdiv(batch, BLOCK),)](
            unit, groups, row_max, logit_sum, hist, batch, dim, unit.stride(0), 1.0 / temperature,
            NUM_GROUPS=num_groups, EUCLIDEAN=euclidean, BLOCK=BLOCK, BLOCK_D=BLOCK_D)
        loss, cumulative = _finish(hist, groups.long(), row_max, logit_sum, num_groups)
        ctx.save_for_backward(unit, groups, row_max, cumulative)
        ctx.temperature, ctx.euclidean, ctx.num_groups = temperature, euclidean, num_groups
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        unit, groups, row_max, cumulative = ctx.saved_tensors
        batch, dim = unit.shape
        scale = float(grad_loss) / (ctx.temperature * batch * (batch - 1))
        grid = (triton.cdiv(batch, BLOCK), triton.cdiv(dim, BLOCK_D))
        rows_part, cols_part = torch.empty_like(unit), torch.empty_like(unit)
        for part, columns in ((rows_part, False), (cols_part, True)):
            _backward_kernel[grid](unit, groups, row_max, cumulative, part, batch, dim, unit.stride(0),
                                   1.0 / ctx.temperature, scale, COLUMNS=columns, NUM_GROUPS=ctx.num_groups,
                                   EUCLIDEAN=ctx.euclidean, BLOCK=BLOCK, BLOCK_D=BLOCK_D)
        return rows_part + cols_part, None, None, None


def _finish(hist: torch.Tensor, groups: torch.Tensor, row_max: torch.Tensor, logit_sum: torch.Tensor,
            num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """O(B G): per-group sums -> histogram by distance -> suffix sums -> the loss, and C_i[d] =
    sum_{d' <= d} N_i[d'] / S_i[d'] for backward."""
    batch = len(groups)
    distances = torch.arange(num_groups, device=groups.device)
    above, below = groups[:, None] + distances, groups[:, None] - distances       # (B, G) group indices
    above_ok, below_ok = above < num_groups, (below >= 0) & (distances > 0)
    by_distance = (hist.gather(1, above.clamp(max=num_groups - 1)) * above_ok
                   + hist.gather(1, below.clamp(min=0)) * below_ok)
    counts = torch.bincount(groups, minlength=num_groups).to(hist.dtype)
    pairs = (counts[above.clamp(max=num_groups - 1)] * above_ok + counts[below.clamp(min=0)] * below_ok)
    pairs[:, 0] -= 1  # the anchor itself
    suffix = by_distance.flip(1).cumsum(1).flip(1)
    present = pairs > 0
    log_suffix = torch.where(present, suffix.clamp_min(torch.finfo(hist.dtype).tiny).log(), 0.0)
    shifted_sum = logit_sum - (batch - 1) * row_max  # sum over j != i of (l_ij - m_i)
    loss = -(shifted_sum.sum() - (pairs * log_suffix).sum()) / (batch * (batch - 1))
    cumulative = torch.where(present, pairs / suffix.clamp_min(torch.finfo(hist.dtype).tiny), 0.0).cumsum(1)
    return loss, cumulative.contiguous()
