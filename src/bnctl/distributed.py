"""Batch statistics over every rank of a process group (``torch.distributed``; gloo or NCCL).

Each rank reduces its own slice to per-channel ``(count, mean, M2)`` (PyTorch's
kernel), one collective gathers every rank's triple (an ``all_reduce`` of a
table in which each rank fills its own row) and each rank merges them the
same way, in float64 (Chan et al.'s parallel formula: stable, exact for any
split, an empty slice contributing nothing). Normalization with those
statistics has a hand-written backward whose one collective sums two
per-channel reductions over the ranks, so the gradient reaching each rank's
input includes what every other rank's loss says about the shared mean and
variance.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["GlobalStats", "across_ranks", "active", "gather_rows", "merge_rows", "stats_dtype", "sync_normalize"]


def active() -> bool:
    """Whether a default process group is initialized (else synchronization is a no-op)."""
    return dist.is_available() and dist.is_initialized()


def gather_rows(row: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``row``, stacked in rank order: ``(world_size, *row.shape)``, on every rank.

    Differentiable (when ``row`` requires grad): the backward sums, over
    ranks, the gradients each rank gives to this rank's row.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.cat([row.new_zeros((rank, *row.shape)), row.unsqueeze(0),
                       row.new_zeros((world - rank - 1, *row.shape))])
    if row.requires_grad and torch.is_grad_enabled():
        return _AllReduce.apply(table, group)
    dist.all_reduce(table, group=group)
    return table


class _AllReduce(torch.autograd.Function):
    """A summing ``all_reduce`` whose backward is the same ``all_reduce`` of the gradients."""

    @staticmethod
    def forward(ctx: Any, table: Tensor, group: Any) -> Tensor:
        ctx.group = group
        table = table.clone()
        dist.all_reduce(table, group=group)
        return table

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def merge_rows(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-rank ``(count, mean, M2)`` rows (shape ``(world, C)``): the union's count, mean, M2."""
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


class GlobalStats(NamedTuple):
    """Per-channel statistics of the union of every rank's batch: mean and biased variance (float64)
    and the total count of values per channel."""

    mean: Tensor
    var: Tensor
    n: int


def across_ranks(mean: Tensor, var: Tensor, n: int, group: Any = None) -> GlobalStats:
    """This rank's per-channel mean and biased variance over ``n`` values merged with every other
    rank's (each rank's own from :func:`bnctl.functional.batch_stats`; ``n`` may be 0): the union's
    statistics, in float64, the same on every rank. One collective; every rank must call it. No
    gradient."""
    with torch.no_grad():
        mean, m2 = mean.to(torch.float64), var.to(torch.float64) * n
        counts, means, m2s = gather_rows(torch.stack([torch.full_like(mean, float(n)), mean, m2]), group).unbind(1)
        total, mean_g, m2_g = merge_rows(counts, means, m2s)
    count = int(total[0]) if total.numel() else 0  # equal over channels; one host read
    return GlobalStats(mean_g, m2_g / max(count, 1), count)


class _SyncNormalize(torch.autograd.Function):
    """``y = (x - mean) / sqrt(var + eps) * w + b`` with ``mean = alpha * mean_G + (1 - alpha) * mu``
    (the variance alike), ``mean_G``/``var_G`` over every rank's batch and ``mu``/``sigma2`` constants.

    Backward, per channel, with ``G1 = sum(dy)`` and ``Gxy = sum(dy * (x - mean))`` summed over all
    ranks (the one collective of the backward) and ``N`` the total count:
    ``dx = w * invstd * (dy - alpha/N * G1 - alpha/N * invstd^2 * (x - mean_G) * Gxy)``;
    ``dw`` and ``db`` are this rank's own sums (summed over ranks they are the whole batch's).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, alpha: float,
                running_mean: Tensor | None, running_var: Tensor | None, eps: float,
                group: Any, stats: GlobalStats) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mean, var = stats.mean, stats.var
        if alpha != 1.0:
            mean = alpha * mean + (1.0 - alpha) * running_mean.to(torch.float64)
            var = alpha * var + (1.0 - alpha) * running_var.to(torch.float64)
        dtype = stats_dtype(x, weight)
        mean, var = mean.to(dtype), var.to(dtype)
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, var, stats.mean.to(dtype))
        ctx.alpha, ctx.eps, ctx.group, ctx.n = alpha, eps, group, stats.n
        count = torch.tensor(stats.n)
        ctx.mark_non_differentiable(stats.mean, stats.var, count)
        return y, stats.mean, stats.var, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, weight, mean, var, mean_g = ctx.saved_tensors
        shape = (1, -1) + (1,) * (dy.dim() - 2)
        w = torch.ones_like(mean) if weight is None else weight
        if x.numel():  # one fused pass: dy * w * invstd, sum(dy * x_hat), sum(dy) (PyTorch's eval backward)
            dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, x, w, mean, var, None, None, False, ctx.eps, [True, True, True])
        else:  # an empty slice (the kernel does not take one) still joins the collective
            dx, sum_dy_xhat, sum_dy = torch.empty_like(x), torch.zeros_like(w), torch.zeros_like(w)
        invstd = torch.rsqrt(var + ctx.eps)
        sums = torch.stack([sum_dy, sum_dy_xhat / invstd])  # sum(dy), sum(dy * (x - mean)), this rank's
        dist.all_reduce(sums, group=ctx.group)
        k = ctx.alpha / max(ctx.n, 1)
        scale = w * invstd
        slope = -scale * k * invstd * invstd * sums[1]  # dx += x * slope + offset, per channel
        offset = -scale * k * sums[0] - slope * mean_g
        grad_x = dx.addcmul_(x, slope.reshape(shape)).add_(offset.reshape(shape))
        grad_w = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def stats_dtype(x: Tensor, weight: Tensor | None) -> torch.dtype:
    """The dtype PyTorch's kernel wants statistics in: the parameters' (float32 parameters with a
    float16/bfloat16 input under mixed precision), else the input's, at least float32."""
    if weight is not None:
        return weight.dtype
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def sync_normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: Any, stats: GlobalStats, *,
    alpha: float = 1.0, running_mean: Tensor | None = None, running_var: Tensor | None = None,
) -> tuple[Tensor, GlobalStats]:
    """``x`` normalized with ``stats``, the statistics of every rank's batch (:func:`across_ranks` of
    this ``x``), blended with the running ones for ``alpha < 1``; and those statistics. The backward
    makes one collective."""
    y, mean, var, count = _SyncNormalize.apply(x, weight, bias, alpha, running_mean, running_var, eps, group,
                                               stats)
    return y, GlobalStats(mean, var, int(count))
