"""The functional core: batch statistics, normalization, running updates.

Every BatchNorm computation in bnctl goes through :func:`batch_norm`; modules
only hold state and call it. Conventions (SPEC section 1, stated once in the
README): for ``x`` of shape ``(N, C, *)`` a channel's statistics use
``n = N * prod(*)`` values; normalization uses the biased variance; running
updates store the unbiased variance ``var_B * n / (n - 1)``; the EMA momentum
``m`` is the weight of the new batch:

.. math::

    \\mathrm{running\\_mean} \\leftarrow (1 - m)\\,\\mathrm{running\\_mean} + m\\,\\mu_B, \\qquad
    \\mathrm{running\\_var} \\leftarrow (1 - m)\\,\\mathrm{running\\_var} + m\\,\\sigma^2_B\\,\\frac{n}{n-1}

Non-finite batch statistics are never written: the whole update of that
batch is skipped (and reported to the caller) without a host synchronization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import _reduce_dims, normalize_with_stats
from .policy import Mode

__all__ = [
    "Accumulator",
    "batch_norm",
    "batch_stats",
    "ema_update_",
    "Status",
    "cumulative_update_",
    "commit_pooled_",
    "renorm_limits",
]


class BatchStats(NamedTuple):
    mean: Tensor
    var: Tensor  # biased
    n: int


def _values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


def batch_stats(x: Tensor) -> BatchStats:
    """Per-channel mean and biased variance of ``x`` (no gradient), at native speed.

    Uses :func:`torch.batch_norm_update_stats` without buffers (its own
    in-place update of buffers is silently dropped under ``torch.compile``, so
    bnctl updates buffers itself). Inputs of lower precision than float32 are
    reduced in float32.

    Example:
        >>> x = torch.randn(4, 3, 5)
        >>> mean, var, n = batch_stats(x)
        >>> n, torch.allclose(var, x.var((0, 2), unbiased=False))
        (20, True)
    """
    with torch.no_grad():
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        mean, var = torch.batch_norm_update_stats(xs, None, None, 0.0)
    return BatchStats(mean, var, _values_per_channel(x))


def _differentiable_stats(x: Tensor) -> BatchStats:
    var, mean = torch.var_mean(x, _reduce_dims(x.dim()), unbiased=False)
    return BatchStats(mean, var, _values_per_channel(x))


Status = Union[bool, Tensor]
"""Whether an update was applied: a bool on the CPU, a 0-dim bool tensor elsewhere."""


def _commit(
    targets: list[Tensor],
    candidates: Tensor,
    num_batches_tracked: Tensor | None,
    host_check: bool | None = None,
) -> Status:
    """Copy new values into ``targets``, all or none: none if any value is non-finite.

    ``candidates`` is the flat concatenation of the new values, in the order
    of ``targets``. One float64 sum over all of them decides (so values large
    enough to overflow float64 count as non-finite too). On the CPU the
    check branches in Python (free there); on other devices it is a masked
    copy in a handful of kernels, so no forward waits for the device.
    ``host_check`` overrides that choice (for tests).
    """
    total = candidates.sum(dtype=torch.float64)
    sizes = [t.numel() for t in targets]
    if host_check is None:
        host_check = targets[0].device.type == "cpu"
    if host_check:
        ok = math.isfinite(float(total))
        if ok:
            for target, new in zip(targets, candidates.split(sizes)):
                target.copy_(new.view_as(target))
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
        return ok
    flag = (total * 0) == 0  # False for inf and nan
    current = torch.cat([t.reshape(-1).to(candidates.dtype) for t in targets])
    merged = torch.where(flag, candidates, current)
    _copy_all(targets, [m.view_as(t) for m, t in zip(merged.split(sizes), targets)])
    if num_batches_tracked is not None:
        num_batches_tracked.add_(flag)
    return flag


def _copy_all(targets: list[Tensor], values: list[Tensor]) -> None:
    """``target.copy_(value)`` for each pair, in one fused call where torch has it (>= 2.2)."""
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(targets, values)
    else:
        for target, value in zip(targets, values):
            target.copy_(value)


def _ema_weight(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """EMA weight of the new batch; ``momentum=None`` is PyTorch's cumulative average."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None.")
    # Same float as PyTorch's `num_batches_tracked.add_(1); 1.0 / float(num_batches_tracked)`.
    return 1.0 / float(num_batches_tracked + 1)


def ema_update_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    stats: BatchStats,
    momentum: float | None,
) -> Status:
    """Exponential (or, with ``momentum=None``, cumulative-average) update in place.

    ``momentum=None`` uses ``m = 1 / num_batches_tracked`` after the
    increment, as PyTorch does. Nothing is written when a statistic is
    non-finite.

    Returns:
        Whether the update was applied (a bool on the CPU, a 0-dim bool tensor elsewhere).
    """
    with torch.no_grad():
        weight = _ema_weight(momentum, num_batches_tracked)
        current = torch.stack([running_mean, running_var])
        batch = torch.stack([stats.mean, stats.var * (stats.n / (stats.n - 1))]).to(current.dtype)
        return _commit(
            [running_mean, running_var], torch.lerp(current, batch, weight).reshape(-1),
            num_batches_tracked,
        )


@dataclass
class Accumulator:
    """Exact population statistics over batches (Chan et al.'s parallel merge, float64).

    Holds the count, mean and sum of squared deviations (M2) of every value
    seen since it was created. Merging ``k`` batches gives the same result,
    up to float64 rounding, however the data was split.
    """

    count: Tensor  # float64 scalar
    mean: Tensor  # float64 (C,)
    m2: Tensor  # float64 (C,)

    @classmethod
    def empty(cls, num_features: int, device: torch.device | None = None) -> Accumulator:
        zeros = torch.zeros(num_features, dtype=torch.float64, device=device)
        return cls(torch.zeros((), dtype=torch.float64, device=device), zeros, zeros.clone())

    @property
    def tensors(self) -> list[Tensor]:
        """``[mean, m2, count]``, the order of :meth:`merged`'s values."""
        return [self.mean, self.m2, self.count.view(1)]

    def merged(self, stats: BatchStats) -> list[Tensor]:
        """``[mean, m2, count]`` after merging one more batch's (n, mean, biased var)."""
        mean_b = stats.mean.to(torch.float64)
        m2_b = stats.var.to(torch.float64) * stats.n
        total = self.count + stats.n
        delta = mean_b - self.mean
        mean = self.mean + delta * (stats.n / total)
        m2 = self.m2 + m2_b + delta * delta * (self.count * stats.n / total)
        return [mean, m2, total.view(1)]

    def population(self) -> tuple[Tensor, Tensor]:
        """(mean, unbiased variance) of everything merged so far."""
        return _population(self.mean, self.m2, self.count)


def _population(mean: Tensor, m2: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    return mean, m2 / (count - 1).clamp_min(1)


def cumulative_update_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    stats: BatchStats,
    accumulator: Accumulator,
) -> Status:
    """Merge a batch into ``accumulator`` and write the exact population statistics.

    ``running_mean``/``running_var`` become the mean and unbiased variance of
    all values merged since the accumulator was created. Nothing is written
    for a batch with non-finite statistics.

    Returns:
        Whether the update was applied (a bool on the CPU, a 0-dim bool tensor elsewhere).
    """
    with torch.no_grad():
        merged = accumulator.merged(stats)
        mean, var = _population(*merged)
        return _commit(
            [*accumulator.tensors, running_mean, running_var],
            torch.cat([*merged, mean, var]),
            num_batches_tracked,
        )


def commit_pooled_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    pooled: Accumulator,
    update: str,
    momentum: float | None,
    accumulator: Accumulator | None = None,
) -> Status | None:
    """Apply one ``update`` with the statistics pooled in ``pooled``, as if it were one batch.

    Returns ``None`` when nothing was pooled (or fewer than two values).
    """
    n = int(pooled.count)
    if n < 2:
        return None
    stats = BatchStats(pooled.mean, pooled.m2 / n, n)  # biased variance of the pooled batch
    if update == "ema":
        return ema_update_(running_mean, running_var, num_batches_tracked, stats, momentum)
    if update == "cumulative" and accumulator is not None:
        return cumulative_update_(running_mean, running_var, num_batches_tracked, stats, accumulator)
    raise ValueError(f"expected update 'ema' or 'cumulative', got {update!r}.")


def renorm_limits(
    rmax: float, dmax: float, warmup: tuple[int, int], step: Tensor | None
) -> tuple[Tensor | float, Tensor | float]:
    """Batch Renormalization clipping limits ``(r_max, d_max)`` after ``step`` updates.

    Until ``warmup[0]`` updates the limits are ``(1, 0)`` (plain BatchNorm);
    they then grow linearly to ``(rmax, dmax)`` at ``warmup[1]``. Computed as
    tensors from ``num_batches_tracked``, without a host synchronization.
    """
    start, end = warmup
    if step is None:
        return rmax, dmax
    if end == start:
        progress = (step >= start).to(torch.float32)
    else:
        progress = ((step.to(torch.float32) - start) / (end - start)).clamp(0.0, 1.0)
    return 1.0 + (rmax - 1.0) * progress, dmax * progress


def _renorm(
    x: Tensor,
    stats: BatchStats,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    limits: tuple[Tensor | float, Tensor | float],
) -> Tensor:
    """Batch Renormalization (Ioffe 2017) forward; ``r`` and ``d`` are constants in backward.

    ``y = w * (x_hat_B * r + d) + b`` equals native batch-statistics BatchNorm
    with weight ``w * r`` and bias ``b + w * d``, so forward and backward run
    at native speed and the gradient through ``mean_B``/``var_B`` is exact.
    """
    rmax, dmax = limits
    with torch.no_grad():
        running_std = torch.sqrt(running_var + eps)
        r = torch.sqrt(stats.var + eps) / running_std
        r = torch.minimum(torch.maximum(r, 1.0 / torch.as_tensor(rmax)), torch.as_tensor(rmax))
        d = (stats.mean - running_mean) / running_std
        d = torch.minimum(torch.maximum(d, -torch.as_tensor(dmax)), torch.as_tensor(dmax))
    w = r if weight is None else weight * r
    b = d if weight is None else weight * d
    if bias is not None:
        b = b + bias
    return F.batch_norm(x, None, None, w, b, True, 0.0, eps)


def _one_value_error(x: Tensor, layer: str) -> ValueError:
    return ValueError(
        f"{layer}: expected more than 1 value per channel to compute batch statistics, got "
        f"input of shape {tuple(x.shape)}. Fixes: use a policy that normalizes with running "
        "statistics in this mode (e.g. 'frozen' or 'frozen_stats'), use a larger batch, pass "
        "drop_last=True to the DataLoader, or use a policy with fallback=True to normalize such "
        "batches with the running statistics."
    )


def _native_ema(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Status]:
    """PyTorch's own train-mode BatchNorm, bit for bit, with the non-finite guard.

    The native kernel updates copies of the buffers, committed only if
    finite. (Autograd keeps the tensors passed to the kernel for backward,
    so those must be the copies, not the buffers.)
    """
    new = torch.stack([running_mean, running_var])
    factor = _ema_weight(momentum, num_batches_tracked)
    out = F.batch_norm(x, new[0], new[1], weight, bias, True, factor, eps)
    with torch.no_grad():
        ok = _commit([running_mean, running_var], new.reshape(-1), num_batches_tracked)
    return out, ok


def batch_norm_with_status(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    mode: Mode,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    accumulator: Accumulator | None = None,
    renorm: tuple[Tensor | float, Tensor | float] = (3.0, 5.0),
    fallback: bool = False,
    defer: Accumulator | None = None,
    layer: str = "BatchNorm",
) -> tuple[Tensor, Status | None]:
    """:func:`batch_norm`, also returning whether the running update was applied.

    The second value is ``None`` when no update was attempted, else whether
    it was applied (``False``: skipped for non-finite statistics), as a bool
    on the CPU and a 0-dim bool tensor elsewhere.
    """
    normalize, update = mode
    has_running = running_mean is not None and running_var is not None
    if not has_running and (normalize != "batch" or update != "none"):
        raise ValueError(
            f"{layer}: expected running statistics for mode {tuple(mode)}, got none "
            "(the layer was built with track_running_stats=False). Use a policy that "
            "normalizes with batch statistics and updates nothing, or build the layer with "
            "track_running_stats=True."
        )
    if not isinstance(normalize, str):  # blend weight; the end points are the plain modes
        normalize = {1.0: "batch", 0.0: "running"}.get(float(normalize), float(normalize))
    n = _values_per_channel(x)
    if n == 0:
        update = "none"  # an empty batch never updates statistics
    elif n == 1 and normalize != "running":
        if not (fallback and has_running):
            raise _one_value_error(x, layer)
        normalize, update = "running", "none"
    elif n == 1 and update != "none":
        # Normalizing with running statistics is well defined, but one value per channel
        # has no unbiased variance: skip the update and report it as skipped.
        out = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        return out, False

    if normalize == "batch":
        if update == "ema" and defer is None:
            return _native_ema(
                x, running_mean, running_var, num_batches_tracked, weight, bias, momentum, eps
            )
        if update == "none":
            # Copies of the buffers (updated by the kernel and dropped) make autograd save the
            # same tensors as an updating forward, which activation checkpointing's
            # recomputation under no_update() requires.
            copies = (running_mean.clone(), running_var.clone()) if has_running else (None, None)
            return F.batch_norm(x, *copies, weight, bias, True, 0.0, eps), None
        # One native pass computes the output and, through buffers that start at zero and
        # get momentum 1, this batch's mean and unbiased variance.
        mean_b = torch.zeros_like(running_mean)
        var_b = torch.zeros_like(running_var)
        out = F.batch_norm(x, mean_b, var_b, weight, bias, True, 1.0, eps)
        stats = BatchStats(mean_b, var_b * ((n - 1) / n), n)
    elif normalize == "running":
        # PyTorch's eval kernel, forward and backward (measured faster on the CPU than a
        # scale-and-shift formulation, see benchmarks/). Autograd keeps the statistics
        # passed to it for backward, so an update that follows must not touch those.
        if update == "none":
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps), None
        stats = batch_stats(x)
        out = F.batch_norm(
            x, running_mean.clone(), running_var.clone(), weight, bias, False, 0.0, eps
        )
    elif normalize == "renorm":
        stats = batch_stats(x)
        out = _renorm(x, stats, running_mean, running_var, weight, bias, eps, renorm)
    else:  # blend: alpha * batch + (1 - alpha) * running, gradient through the batch part
        alpha = float(normalize)
        dstats = _differentiable_stats(x)
        mean = alpha * dstats.mean + (1.0 - alpha) * running_mean
        var = alpha * dstats.var + (1.0 - alpha) * running_var
        out = normalize_with_stats(x, mean, var, weight, bias, eps)
        stats = BatchStats(dstats.mean.detach(), dstats.var.detach(), n)

    if update == "none":
        return out, None
    if defer is not None:  # pool this batch's statistics; the buffers wait for the commit
        with torch.no_grad():
            return out, _commit(defer.tensors, torch.cat(defer.merged(stats)), None)
    if update == "ema":
        return out, ema_update_(running_mean, running_var, num_batches_tracked, stats, momentum)
    if accumulator is None:
        raise ValueError(f"{layer}: a cumulative update needs an Accumulator, got None.")
    return out, cumulative_update_(
        running_mean, running_var, num_batches_tracked, stats, accumulator
    )


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    mode: Mode,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    accumulator: Accumulator | None = None,
    renorm: tuple[Tensor | float, Tensor | float] = (3.0, 5.0),
    fallback: bool = False,
    defer: Accumulator | None = None,
    layer: str = "BatchNorm",
) -> Tensor:
    """BatchNorm whose statistics and update are chosen explicitly by ``mode``.

    ``mode.normalize`` picks the statistics (``"batch"``, ``"running"``,
    ``"renorm"`` or a blend weight), ``mode.update`` what happens to
    ``running_mean``/``running_var``/``num_batches_tracked`` (updated in
    place). ``Mode("batch", "ema")`` is bit-identical to
    ``F.batch_norm(..., training=True)`` plus PyTorch's ``num_batches_tracked``
    bookkeeping, except that non-finite statistics are never written. When
    the running statistics normalize and are also updated, normalization uses
    the values from before this batch.

    Args:
        x: input of shape ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` buffers or ``None``.
        weight, bias: ``(C,)`` affine parameters or ``None``.
        mode: a :class:`bnctl.Mode`.
        momentum: EMA weight of the new batch; ``None`` for a cumulative
            average over ``num_batches_tracked``.
        eps: added to the variance.
        num_batches_tracked: incremented when the running statistics are updated.
        accumulator: the :class:`Accumulator` for ``update="cumulative"``.
        renorm: ``(r_max, d_max)`` for ``normalize="renorm"``.
        fallback: normalize a one-value-per-channel batch with the running
            statistics (updating nothing) instead of raising.
        defer: when ``mode`` updates, merge this batch's statistics into this
            :class:`Accumulator` instead of touching the buffers; commit the
            pooled statistics later with :func:`commit_pooled_`.
        layer: the layer's name, for error messages.

    Returns:
        The normalized tensor, of the shape and memory format of ``x``.

    Raises:
        ValueError: one value per channel in a mode that needs batch
            statistics, or a mode that needs running statistics without them.

    Example:
        >>> from bnctl import Mode
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, rm, rv, mode=Mode("running", "ema"), momentum=0.5)
        >>> torch.allclose(y, x / (1 + 1e-5) ** 0.5), bool((rm != 0).all())
        (True, True)
    """
    out, _ = batch_norm_with_status(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        mode=mode,
        momentum=momentum,
        eps=eps,
        num_batches_tracked=num_batches_tracked,
        accumulator=accumulator,
        renorm=renorm,
        fallback=fallback,
        defer=defer,
        layer=layer,
    )
    return out
