"""Batch statistics over every rank of a process group (``torch.distributed``; gloo or NCCL).

Each rank reduces its own slice to per-channel ``(count, mean, M2)`` in
float64; one collective gathers every rank's triple and each rank merges
them the same way (Chan et al.'s parallel formula: stable, exact for any
split, an empty slice contributing nothing). The gather is an ``all_reduce``
of a table in which each rank fills its own row, so its autograd backward is
one ``all_reduce`` too: the gradient reaching each rank's input includes what
every other rank's loss says about the shared mean and variance.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .autograd import reduce_dims

__all__ = ["GlobalStats", "active", "gather_rows", "global_stats", "merge_rows"]


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
    """Per-channel statistics of the union of every rank's batch: mean, biased variance (both
    float64, differentiable with respect to this rank's input) and the total count of values."""

    mean: Tensor
    var: Tensor
    n: int


def global_stats(x: Tensor, group: Any = None) -> GlobalStats:
    """Mean and biased variance per channel over all ranks' ``x`` (``(N_r, C, *)``, any ``N_r >= 0``).

    One collective forward (and, under autograd, one backward). Every rank
    must call it, also with an empty slice; every rank gets the same values.
    """
    dims = reduce_dims(x.dim())
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    xs = x.to(torch.float64)
    mean = xs.sum(dims) / max(n, 1)
    m2 = ((xs - mean.reshape((1, -1) + (1,) * (x.dim() - 2))) ** 2).sum(dims)
    row = torch.stack([torch.full_like(mean, float(n)).detach(), mean, m2])
    counts, means, m2s = gather_rows(row, group).unbind(1)
    total, mean_g, m2_g = merge_rows(counts, means, m2s)
    count = int(total[0]) if total.numel() else 0  # equal over channels; one host read
    return GlobalStats(mean_g, m2_g / max(count, 1), count)
