"""Statistics maths: batch statistics, the EMA, population merges and their accumulators.

Everything here is pure: it computes and returns values (new running values
included) and writes no buffer; :mod:`bnctl.guard` writes.

Conventions (SPEC section 1, stated once in the README): for ``x`` of shape
``(N, C, *)`` a channel's statistics use ``n = N * prod(*)`` values;
normalization uses the biased variance; running updates store the unbiased
variance ``var_B * n / (n - 1)``; the EMA momentum ``m`` is the weight of the
new batch:

.. math::

    \\mathrm{running\\_mean} \\leftarrow (1 - m)\\,\\mathrm{running\\_mean} + m\\,\\mu_B, \\qquad
    \\mathrm{running\\_var} \\leftarrow (1 - m)\\,\\mathrm{running\\_var} + m\\,\\sigma^2_B\\,\\frac{n}{n-1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

import torch
from torch import Tensor

from . import context
from .distributed import across_ranks, gather_rows, merge_rows

__all__ = [
    "Accumulator",
    "BatchAverage",
    "BatchStats",
    "batch_stats",
    "ema",
    "ema_weight",
    "global_stats",
    "new_running_values",
    "population",
    "reduce_dims",
    "values_per_channel",
]


class BatchStats(NamedTuple):
    """One batch's per-channel statistics: mean, biased variance, values per channel.

    The one thing a forward observes of its batch for the running statistics
    (an EMA, a cumulative average, a pool); ``n = 0`` is an empty batch.
    """

    mean: Tensor
    var: Tensor
    n: int


def reduce_dims(ndim: int) -> list[int]:
    """The dimensions a channel's statistics reduce over: all but dim 1."""
    return [0, *range(2, ndim)]


def values_per_channel(x: Tensor, ghost: int | None = None) -> int:
    """``n``: the values a channel's statistics of ``x`` (``(N, C, *)``) are taken over; with ``ghost``,
    those of its smallest slice of ``ghost`` samples (the last one).

    Example:
        >>> values_per_channel(torch.empty(10, 3, 2)), values_per_channel(torch.empty(10, 3, 2), ghost=4)
        (20, 4)
    """
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    samples = x.shape[0]
    if not ghost or samples <= ghost:
        return n
    return n // samples * (samples % ghost or ghost)


def batch_stats(x: Tensor, ctx: int = context.EAGER) -> BatchStats:
    """Per-channel mean and biased variance of ``x`` (no gradient), at native speed.

    Uses :func:`torch.batch_norm_update_stats` without buffers (exporters
    and ``vmap``, ``ctx`` says which, get ``torch.var_mean``, an op every
    exporter knows, with a batching rule). Inputs of lower precision than
    float32 are reduced in float32, as PyTorch's kernels do.

    Example:
        >>> x = torch.randn(4, 3, 5)
        >>> mean, var, n = batch_stats(x)
        >>> n, torch.allclose(var, x.var((0, 2), unbiased=False))
        (20, True)
    """
    with torch.no_grad():
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if not xs.numel():  # an empty batch (the kernel refuses one): no values, zero sums
            mean = var = xs.new_zeros(x.shape[1])
        elif ctx & (context.EXPORTING | context.TRANSFORMED):
            var, mean = torch.var_mean(xs, reduce_dims(x.dim()), unbiased=False)
        else:
            mean, var = torch.batch_norm_update_stats(xs, None, None, 0.0)
    return BatchStats(mean, var, values_per_channel(x))


def global_stats(x: Tensor, group: Any = None, ctx: int = context.EAGER) -> BatchStats:
    """:func:`batch_stats` of the union of every rank's ``x`` in ``group`` (float64; one collective,
    which every rank must make, also with an empty ``x``)."""
    return BatchStats(*across_ranks(*batch_stats(x, ctx), group))


# -- update rules: new values, written by bnctl.guard ------------------------------------------


@overload
def ema_weight(momentum: float | None, num_batches_tracked: Tensor | None) -> float: ...  # (eagerly: a float)


@overload
def ema_weight(momentum: float | None, num_batches_tracked: Tensor | None, ctx: int) -> float | Tensor: ...


def ema_weight(momentum: float | None, num_batches_tracked: Tensor | None, ctx: int = context.EAGER) -> float | Tensor:
    """EMA weight of the new batch; ``momentum=None`` is PyTorch's cumulative average.

    That average's weight depends on ``num_batches_tracked``: a Python float
    as PyTorch computes it, or, in captured code (``ctx``), a tensor, so that
    reading it neither synchronizes nor is baked into the graph.
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None.")
    if ctx != context.EAGER:
        return 1.0 / (num_batches_tracked + 1).to(torch.float64)
    # Same float as PyTorch's `num_batches_tracked.add_(1); 1.0 / float(num_batches_tracked)`.
    return 1.0 / float(num_batches_tracked + 1)


def unbiased(stats: BatchStats) -> Tensor:
    """The batch's unbiased variance; undefined (NaN) for one value per channel."""
    n = stats.n
    if isinstance(n, Tensor):  # a size as torch.jit.trace records it: divide in float64, as Python does
        return stats.var * (n.double() / (n - 1) if n > 1 else math.nan)
    return stats.var * (n / (n - 1) if n > 1 else math.nan)


def ema(running_mean: Tensor, running_var: Tensor, stats: BatchStats, weight: float | Tensor) -> Tensor:
    """New running ``[mean; var]`` as a ``(2, C)`` tensor: the EMA with this batch, computed in at least
    float32 (the guard rounds it to the buffers' dtype once, as PyTorch's kernels do).

    Example:
        >>> stats = BatchStats(torch.full((2,), 4.0), torch.full((2,), 3.0), 4)
        >>> ema(torch.zeros(2), torch.ones(2), stats, 0.5)
        tensor([[2.0000, 2.0000],
                [2.5000, 2.5000]])
    """
    dtype = torch.promote_types(running_mean.dtype, torch.float32)  # (half buffers: computed in float32)
    current = torch.stack([running_mean, running_var]).to(dtype)
    batch = torch.stack([stats.mean, unbiased(stats)]).to(dtype)
    if isinstance(weight, Tensor):
        weight = weight.to(dtype)
    return torch.lerp(current, batch, weight)


def population(mean: Tensor, m2: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, unbiased variance) from a count, a mean and a sum of squared deviations."""
    return mean, m2 / (count - 1).clamp_min(1)


@dataclass
class Accumulator:
    """Exact population statistics over batches (Chan et al.'s parallel merge, float64).

    Holds the count, mean and sum of squared deviations (M2) of every value
    seen since it was created, and the number of batches they came from.
    Merging ``k`` batches gives the same result, up to float64 rounding,
    however the data was split.
    """

    count: Tensor  # float64 scalar
    mean: Tensor  # float64 (C,)
    m2: Tensor  # float64 (C,)
    batches: Tensor  # float64 scalar

    @classmethod
    def empty(cls, num_features: int, device: torch.device | None = None) -> Accumulator:
        zeros = torch.zeros(num_features, dtype=torch.float64, device=device)
        scalar = torch.zeros((), dtype=torch.float64, device=device)
        return cls(scalar, zeros, zeros.clone(), scalar.clone())

    @property
    def tensors(self) -> list[Tensor]:
        """The tensors :meth:`merged` gives new values for, in that order."""
        return [self.mean, self.m2, self.count.view(1), self.batches.view(1)]

    def merged(self, stats: BatchStats) -> list[Tensor]:
        """New values of :attr:`tensors` after merging one more batch's (n, mean, biased var)."""
        mean_b = stats.mean.to(torch.float64)
        m2_b = stats.var.to(torch.float64) * stats.n
        total = self.count + stats.n
        delta = mean_b - self.mean
        mean = self.mean + delta * (stats.n / total)
        m2 = self.m2 + m2_b + delta * delta * (self.count * stats.n / total)
        return [mean, m2, total.view(1), (self.batches + 1).view(1)]

    def population(self) -> tuple[Tensor, Tensor]:
        """(mean, unbiased variance) of every value merged so far."""
        return population(self.mean, self.m2, self.count)

    def as_batch(self) -> BatchStats:
        """Everything merged so far as one batch (biased variance)."""
        n = int(self.count)
        return BatchStats(self.mean, self.m2 / max(n, 1), n)

    def across(self, group: Any = None) -> Accumulator:
        """Every rank's accumulator merged (one collective; every rank must call it)."""
        row = torch.stack([self.count.expand_as(self.mean), self.mean, self.m2, self.batches.expand_as(self.mean)])
        counts, means, m2s, batches = gather_rows(row, group).unbind(1)
        count, mean, m2 = merge_rows(counts, means, m2s)
        return Accumulator(count[0], mean, m2, batches.sum(0)[0])


@dataclass
class BatchAverage:
    """The average of per-batch means and of per-batch unbiased variances (float64).

    What ``torch.optim.swa_utils.update_bn`` and pycls compute. Unlike
    :class:`Accumulator` it leaves out the spread between batch means, so it
    underestimates the variance when batches differ, and it depends on the
    batch size.
    """

    mean: Tensor  # float64 (C,)
    var: Tensor  # float64 (C,)
    count: Tensor  # float64 scalar: values merged
    batches: Tensor  # float64 scalar

    @classmethod
    def empty(cls, num_features: int, device: torch.device | None = None) -> BatchAverage:
        zeros = torch.zeros(num_features, dtype=torch.float64, device=device)
        scalar = torch.zeros((), dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), scalar, scalar.clone())

    @property
    def tensors(self) -> list[Tensor]:
        return [self.mean, self.var, self.count.view(1), self.batches.view(1)]

    def merged(self, stats: BatchStats) -> list[Tensor]:
        batches = self.batches + 1
        mean = self.mean + (stats.mean.to(torch.float64) - self.mean) / batches
        var = self.var + (unbiased(stats).to(torch.float64) - self.var) / batches
        return [mean, var, (self.count + stats.n).view(1), batches.view(1)]

    def population(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.var

    def across(self, group: Any = None) -> BatchAverage:
        """Every rank's average merged, weighted by batches (one collective; every rank must call it)."""
        row = torch.stack([self.mean, self.var, self.count.expand_as(self.mean), self.batches.expand_as(self.mean)])
        means, variances, counts, batches = gather_rows(row, group).unbind(1)
        total = batches.sum(0)
        weights = batches / total.clamp_min(1)
        return BatchAverage((weights * means).sum(0), (weights * variances).sum(0), counts.sum(0)[0], total[0])


def new_running_values(
    cumulative: bool,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    stats: BatchStats,
    momentum: float | None,
    accumulator: Accumulator | None = None,
    ctx: int = context.EAGER,
) -> tuple[list[Tensor], Tensor]:
    """The tensors an update writes and their new values, flat, for :func:`bnctl.guard.copy_if_finite_`.

    An EMA (``cumulative=False``): the running statistics, by the EMA formula.
    A cumulative average: ``accumulator`` merged with the batch, and the
    running statistics set to its population statistics.
    """
    if not cumulative:
        return [running_mean, running_var], ema(running_mean, running_var, stats,
                                                ema_weight(momentum, num_batches_tracked, ctx)).reshape(-1)
    if accumulator is None:
        raise ValueError("a cumulative update needs an Accumulator, got None.")
    merged = accumulator.merged(stats)
    mean, var = population(*merged[:3])
    return [*accumulator.tensors, running_mean, running_var], torch.cat([*merged, mean, var])
