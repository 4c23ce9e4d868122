"""Fused Triton kernels for the ordinal group contrastive loss (paper Eq. 2), with no B x B matrix
in memory, registered as the custom ops `groupdir::group_contrast` (forward) and
`groupdir::group_contrast_backward`, so that torch.compile keeps them in its graph.

Forward, one program per block of anchors (flash-attention style): walk the column blocks, compute
the similarity tile from the features, keep an online row maximum m_i, the sum of the anchor's
logits, and P_i[g] = sum over columns k of group g of exp(l_ik - m_i) (a tile's contribution is
one matmul with the columns' one-hot groups). Only these per-anchor statistics leave the kernel;
the histogram by group DISTANCE, H_i[d] = P_i[g_i + d] + P_i[g_i - d], its suffix sums and the loss
are O(B G) and done in torch.

Backward, one program per block of samples i: dz_i = sum_k (G_ik + G_ki) z_k, where
G_ik = dL/d(dot_ik) from anchor i's row, -(1 - e_ik C_i[d_ik]) / (t B (B-1)) times the slope of the
similarity (DESIGN.md). The similarity is symmetric, so one tile of dot_ik gives both G_ik (with
anchor i's m_i and C_i) and G_ki (with anchor k's): each tile is built once, its D-long dot done
once, and then multiplied into the program's own rows of dz one feature chunk at a time
(read-modify-write of rows no other program touches: no atomics). Matmul work: 2 B^2 D
multiply-adds (the tile, then the product), twice the forward's similarity, whatever D. The L2
normalisation's gradient is left to autograd around the op.

Both kernels are autotuned (block sizes, warps, stages) per (B, D, G, similarity, precision), and
their feature matmuls take float32 (ieee), tf32 or bfloat16 inputs, always accumulating in float32.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from groupdir.kernels.flops import histogram_width

EPSILON = 1e-12  # as the torch path: ||a - b||^2 is clamped here before the square root


def _tuning_configs() -> list[triton.Config]:
    """Block sizes (>= 16: tl.dot's smallest tile), warps and pipeline stages to choose from, per
    (B, D, G, similarity, precision). Under TRITON_INTERPRET=1 there is nothing to tune, and the
    autotuner would run every config on the CPU at each new key: one config there, with unequal
    row and column blocks so that the tests catch a transposed tile."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}, num_warps=warps, num_stages=stages)
            for m, n, d, warps, stages in ((32, 32, 32, 4, 2), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3),
                                           (128, 64, 32, 8, 3))]


TUNING_KEY = ["batch", "dim", "NUM_GROUPS", "EUCLIDEAN", "PRECISION"]
# Each new key times every config. Triton's default (25 ms of warm-up and 100 ms of runs per config)
# would spend about a minute of `make gpu-check` (some 60 keys, 8 kernel configs each) on tuning alone.
QUICK_TIMING = functools.partial(triton.testing.do_bench, warmup=5, rep=25)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in float32, the inputs entering as float32 (ieee), tf32, or rounded to
    bfloat16 (bf16)."""
    if PRECISION == "bf16":
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _load_rows(z_ptr, rows, feats, batch, dim, stride):
    """z[rows, feats], zero outside the batch and the features."""
    return tl.load(z_ptr + rows[:, None] * stride + feats[None, :],
                   mask=(rows[:, None] < batch) & (feats[None, :] < dim), other=0.0)


@triton.jit
def _pairs(rows, cols, batch):
    """The tile's ordered pairs i != k inside the batch."""
    return (rows[:, None] < batch) & (cols[None, :] < batch) & (rows[:, None] != cols[None, :])


@triton.jit
def _logits_tile(z_ptr, rows, cols, batch, dim, stride, inv_t, EUCLIDEAN: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows, cols) similarity / t, and d(similarity)/d(dot) for the chain rule."""
    dot = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        dot = _dot(_load_rows(z_ptr, rows, feats, batch, dim, stride),
                   tl.trans(_load_rows(z_ptr, cols, feats, batch, dim, stride)), dot, PRECISION)
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


@triton.autotune(configs=_tuning_configs(), key=TUNING_KEY, do_bench=QUICK_TIMING)
@triton.jit
def _forward_kernel(z_ptr, group_ptr, max_ptr, sum_ptr, hist_ptr, batch, dim, stride, inv_t,
                    NUM_GROUPS: tl.constexpr, EUCLIDEAN: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bins = tl.arange(0, NUM_GROUPS)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    hist = tl.zeros((BLOCK_M, NUM_GROUPS), dtype=tl.float32)
    for c0 in range(0, batch, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        logits, _ = _logits_tile(z_ptr, rows, cols, batch, dim, stride, inv_t, EUCLIDEAN, PRECISION, BLOCK_D)
        valid = _pairs(rows, cols, batch)
        logit_sum += tl.sum(tl.where(valid, logits, 0.0), axis=1)
        new_max = tl.maximum(row_max, tl.max(tl.where(valid, logits, float("-inf")), axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.where(row_max == float("-inf"), 0.0, tl.exp(row_max - safe_max))
        exps = tl.where(valid, tl.exp(logits - safe_max[:, None]), 0.0)
        col_groups = tl.load(group_ptr + cols, mask=cols < batch, other=-1)
        one_hot = (col_groups[:, None] == bins[None, :]).to(tl.float32)
        # Always IEEE: the exps go straight into the loss's log-sums, and this product is G / D of
        # the similarity's work.
        hist = hist * rescale[:, None] + tl.dot(exps, one_hot, input_precision="ieee")
        row_max = new_max
    in_batch = rows < batch
    tl.store(max_ptr + rows, row_max, mask=in_batch)
    tl.store(sum_ptr + rows, logit_sum, mask=in_batch)
    tl.store(hist_ptr + rows[:, None] * NUM_GROUPS + bins[None, :], hist, mask=in_batch[:, None])


@triton.jit
def _softmax_weight(logits, distance, valid, anchors, batch, max_ptr, cum_ptr, NUM_GROUPS: tl.constexpr):
    """e_ak C_a[d_ak] = exp(l_ak - m_a) C_a[d_ak] over the tile, for anchors a given as a column
    (rows[:, None]: the tile's rows are the anchors) or a row (cols[None, :])."""
    anchor_max = tl.load(max_ptr + anchors, mask=anchors < batch, other=0.0)
    cumulative = tl.load(cum_ptr + anchors * NUM_GROUPS + distance, mask=valid, other=0.0)
    return tl.exp(tl.where(valid, logits - anchor_max, 0.0)) * cumulative


@triton.jit
def _add_product(grad_ptr, z_ptr, grad, mine, others, batch, dim, stride, PRECISION: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """dz[mine] += grad @ z[others], a feature chunk at a time, into rows only this program writes."""
    for d0 in range(0, dim, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        out = grad_ptr + mine[:, None] * dim + feats[None, :]
        in_bounds = (mine[:, None] < batch) & (feats[None, :] < dim)
        partial = tl.load(out, mask=in_bounds, other=0.0)
        tl.store(out, _dot(grad, _load_rows(z_ptr, others, feats, batch, dim, stride), partial, PRECISION),
                 mask=in_bounds)


@triton.autotune(configs=_tuning_configs(), key=TUNING_KEY, do_bench=QUICK_TIMING,
                 reset_to_zero=["grad_ptr"])  # the kernel adds into grad: zero it before each timed run
@triton.jit
def _backward_kernel(z_ptr, group_ptr, max_ptr, cum_ptr, grad_ptr, batch, dim, stride, inv_t, scale,
                     NUM_GROUPS: tl.constexpr, EUCLIDEAN: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz_i = sum_k (G_ik + G_ki) z_k for this program's block of samples i, into a zeroed grad."""
    mine = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mine_groups = tl.load(group_ptr + mine, mask=mine < batch, other=0)
    for o0 in range(0, batch, BLOCK_N):
        others = o0 + tl.arange(0, BLOCK_N)
        logits, slope = _logits_tile(z_ptr, mine, others, batch, dim, stride, inv_t, EUCLIDEAN, PRECISION, BLOCK_D)
        valid = _pairs(mine, others, batch)
        others_groups = tl.load(group_ptr + others, mask=others < batch, other=0)
        distance = tl.abs(mine_groups[:, None] - others_groups[None, :])
        # -(1 - w_ik) - (1 - w_ki): anchor i's term and anchor k's, on the same logit
        weights = (_softmax_weight(logits, distance, valid, mine[:, None], batch, max_ptr, cum_ptr, NUM_GROUPS)
                   + _softmax_weight(logits, distance, valid, others[None, :], batch, max_ptr, cum_ptr, NUM_GROUPS))
        grad = tl.where(valid, (weights - 2.0) * scale * slope, 0.0)
        _add_product(grad_ptr, z_ptr, grad, mine, others, batch, dim, stride, PRECISION, BLOCK_D)


def _blocks_of_rows(batch: int):
    """The launch grid: one program per BLOCK_M samples, whichever config the autotuner picks."""
    return lambda meta: (triton.cdiv(batch, meta["BLOCK_M"]),)


@torch.library.custom_op("groupdir::group_contrast", mutates_args=())
def group_contrast(unit: torch.Tensor, groups: torch.Tensor, num_groups: Optional[int], temperature: float,
                   euclidean: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of L2-normalised float32 features `unit` (B, D) and groups 0..G-1 (B,), and what
    backward needs: each anchor's largest logit m_i (B,) and C_i[d] (B, W), W = histogram_width(G).
    G is `num_groups`, or when None the data's (then W is known only once the op has run)."""
    unit = unit.contiguous()
    batch, dim = unit.shape
    largest = int(groups.max())
    if num_groups is not None and largest >= num_groups:
        raise ValueError(f"group {largest} is out of range for num_groups={num_groups}")
    width = histogram_width(largest + 1 if num_groups is None else num_groups)
    row_max, logit_sum = unit.new_empty(batch), unit.new_empty(batch)
    hist = unit.new_empty(batch, width)
    _forward_kernel[_blocks_of_rows(batch)](
        unit, groups.to(torch.int32).contiguous(), row_max, logit_sum, hist, batch, dim, unit.stride(0),
        1.0 / temperature, NUM_GROUPS=width, EUCLIDEAN=euclidean, PRECISION=precision)
    loss, cumulative = _finish(hist, groups.long(), row_max, logit_sum, width)
    return loss, row_max, cumulative


@group_contrast.register_fake
def _(unit, groups, num_groups, temperature, euclidean, precision):
    # Without num_groups the width comes from the largest group, which only the data knows: torch.compile
    # then breaks the graph here, unless fullgraph=True (which captures data-dependent shapes).
    width = torch.library.get_ctx().new_dynamic_size() if num_groups is None else histogram_width(num_groups)
    return unit.new_empty(()), unit.new_empty(len(unit)), unit.new_empty(len(unit), width)


@torch.library.custom_op("groupdir::group_contrast_backward", mutates_args=())
def group_contrast_backward(unit: torch.Tensor, groups: torch.Tensor, row_max: torch.Tensor,
                            cumulative: torch.Tensor, temperature: float, euclidean: bool,
                            precision: str) -> torch.Tensor:
    """d(group_contrast's loss)/d(unit) for an upstream gradient of 1."""
    unit = unit.contiguous()
    batch, dim = unit.shape
    grad = unit.new_zeros(batch, dim)
    _backward_kernel[_blocks_of_rows(batch)](
        unit, groups.to(torch.int32).contiguous(), row_max, cumulative.contiguous(), grad, batch, dim,
        unit.stride(0), 1.0 / temperature, 1.0 / (temperature * batch * (batch - 1)),
        NUM_GROUPS=cumulative.shape[1], EUCLIDEAN=euclidean, PRECISION=precision)
    return grad


@group_contrast_backward.register_fake
def _(unit, groups, row_max, cumulative, temperature, euclidean, precision):
    return unit.new_empty(unit.shape)


def _save_for_backward(ctx, inputs, output):
    unit, groups, _, temperature, euclidean, precision = inputs
    _, row_max, cumulative = output
    ctx.mark_non_differentiable(row_max, cumulative)
    ctx.save_for_backward(unit, groups, row_max, cumulative)
    ctx.settings = temperature, euclidean, precision


def _backward(ctx, grad_loss, _grad_row_max, _grad_cumulative):
    unit, groups, row_max, cumulative = ctx.saved_tensors
    grad_unit = grad_loss * group_contrast_backward(unit, groups, row_max, cumulative, *ctx.settings)
    return grad_unit, None, None, None, None, None


group_contrast.register_autograd(_backward, setup_context=_save_for_backward)


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
