"""The one place that writes running statistics (and bnctl's pools): all or nothing, never non-finite.

Every write of new values goes through :func:`copy_if_finite_` (or, where a
normalization kernel computed them, :func:`keep_if_finite_` and
:func:`write_staged_`): if any new value (as rounded to its target's
dtype) is NaN or infinite, nothing is written and the counters stay; else
every target is written and each counter (``num_batches_tracked``, the
layer's device counter of applied updates) grows by one.

How the check runs depends on where (``ctx``, :mod:`bnctl.context`):

* eagerly on the CPU it branches in Python (reading a CPU value is free);
* eagerly on other devices it is a masked copy, so no forward waits for the
  device; on CUDA with Triton an EMA is one fused kernel
  (:func:`bnctl.kernels.ema_if_finite_`);
* in captured code (compiled, exported, traced, ``vmap``) it is a masked
  copy with ``torch.isfinite``, which compilers keep (an arithmetic identity
  such as ``x * 0 == 0`` is constant-folded to True by inductor), and plain
  ``copy_`` calls, which tracers and transforms understand.

Eager writes go through ``.data``, as PyTorch's own BatchNorm kernel writes
its running statistics: without an autograd version bump, so a graph that
saved them (an earlier eval-mode forward) keeps working and, as in PyTorch,
reads the new values in its backward.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from . import context, kernels
from .stats import Accumulator, BatchStats, ema_weight, new_running_values

__all__ = ["Status", "assign_running_", "copy_if_finite_", "keep_if_finite_", "write_running_", "write_staged_"]

Status = Union[bool, Tensor]
"""Whether new values were written: a bool on the CPU, a 0-dim bool tensor elsewhere."""


def keep_if_finite_(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None, backup: Tensor
) -> bool:
    """Keep new running values a kernel wrote into the buffers in place (eagerly, on the CPU) if every one
    is finite, and count the update; else restore the buffers from ``backup`` (their ``(2, C)`` copy from
    before the kernel) and return False.

    One product decides: ``running_mean . running_var`` is finite when every element is (a non-finite
    element makes its term, and so the sum, non-finite); only if it overflows is every element checked.
    """
    if math.isfinite(torch.dot(running_mean, running_var)) or _finite(running_mean) and _finite(running_var):
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return True
    torch._foreach_copy_([running_mean.data, running_var.data], backup.unbind())
    return False


def write_staged_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    staged: Tensor,
    *,
    counter: Tensor | None = None,
    ctx: int = context.EAGER,
) -> Status:
    """Write new running values staged as a ``(2, C)`` tensor ``[mean; var]``, all or none.

    The values were computed by a normalization kernel into a copy of the
    buffers (:func:`bnctl.functional.update_in_kernel`), so this is one check
    and one write back.
    """
    if ctx == context.EAGER and running_mean.dtype is running_var.dtype is staged.dtype:
        if running_mean.is_cpu:
            if not _finite(staged):
                return False
            torch._foreach_copy_([running_mean.data, running_var.data], staged.unbind())
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            return True
        new_mean, new_var = staged.unbind()
        if kernels.applies(running_mean, running_var, new_mean, new_var, (num_batches_tracked, counter)):
            ok = kernels.ema_if_finite_(running_mean, running_var, new_mean, new_var, None,
                                        counters=(num_batches_tracked, counter))
            if ok is not None:
                return ok
    return copy_if_finite_([running_mean, running_var], staged.reshape(-1), num_batches_tracked,
                           counter=counter, ctx=ctx)


def write_running_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    stats: BatchStats,
    momentum: float | None,
    accumulator: Accumulator | None = None,
    *,
    counter: Tensor | None = None,
    ctx: int = context.EAGER,
) -> Status:
    """One guarded update from a batch's statistics: the EMA with ``momentum``, or, with an
    ``accumulator``, the cumulative average (:func:`bnctl.stats.new_running_values`).

    On CUDA, with Triton, an EMA runs as one fused kernel (the same values,
    guard and counters in one launch); everywhere else the composed ops run.
    """
    if accumulator is None and ctx == context.EAGER and stats.n > 0 and kernels.usable(running_mean):
        new_mean, new_var = stats.mean, stats.var
        if kernels.applies(running_mean, running_var, new_mean, new_var, (num_batches_tracked, counter)):
            factor = stats.n / (stats.n - 1) if stats.n > 1 else math.nan
            weight = float(ema_weight(momentum, num_batches_tracked))
            ok = kernels.ema_if_finite_(running_mean, running_var, new_mean, new_var, weight, factor,
                                        counters=(num_batches_tracked, counter))
            if ok is not None:
                return ok
    targets, values = new_running_values(accumulator is not None, running_mean, running_var, num_batches_tracked,
                                         stats, momentum, accumulator, ctx)
    return copy_if_finite_(targets, values, num_batches_tracked, counter=counter, ctx=ctx)


def copy_if_finite_(
    targets: list[Tensor],
    values: Tensor,
    num_batches_tracked: Tensor | None,
    *,
    counter: Tensor | None = None,
    ctx: int = context.EAGER,
) -> Status:
    """Copy ``values`` into ``targets``, all or none: none if any value is non-finite.

    ``values`` is the flat concatenation of the new values, in the order of
    ``targets``; ``num_batches_tracked`` (if given) is incremented when they
    are written, and so is ``counter`` (a 0-dim int64 tensor, if given).
    What is checked is what would be written: values rounded to each
    target's dtype (a finite float32 value can be infinite in float16).
    """
    values = values.detach()  # (jit.trace does not record no_grad; it records detach)
    counters = [c for c in (num_batches_tracked, counter) if c is not None]
    sizes = [t.numel() for t in targets]
    with torch.no_grad():
        if any(t.dtype != values.dtype for t in targets):
            values = torch.cat([c.to(t.dtype).to(values.dtype) if t.is_floating_point() else c
                                for c, t in zip(values.split(sizes), targets)])
        if ctx == context.EAGER and targets[0].is_cpu:
            if not _finite(values):
                return False
            news = [v.view_as(t) for v, t in zip(values.split(sizes), targets)]
            torch._foreach_copy_([t.data for t in targets], news)
            for c in counters:
                c.add_(1)
            return True
        flag = torch.isfinite(values).all()
        current = torch.cat([t.reshape(-1).to(values.dtype) for t in targets])
        merged = torch.where(flag, values, current).split(sizes)
        news = [m.view_as(t) for m, t in zip(merged, targets)]
        if ctx == context.EAGER:
            torch._foreach_copy_([t.data for t in targets], news)  # one fused call
        else:  # captured: plain copies (vmap has no batching rule for the fused one)
            for target, new in zip(targets, news):
                target.copy_(new)
        for c in counters:
            c.add_(flag)
        return flag


def _finite(values: Tensor) -> bool:
    """Whether every element of a CPU tensor is finite: one sum, and only if that overflows, an
    exact check (a sum of large finite values can be infinite)."""
    return math.isfinite(values.sum()) or bool(torch.isfinite(values).all())


def assign_running_(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None, mean: Tensor,
                    var: Tensor, batches: int) -> None:
    """Set running statistics to population statistics gathered behind the guard (``recalibrate``): the
    pooled batches were finite, and so are their merge; ``num_batches_tracked`` counts the batches."""
    with torch.no_grad():
        running_mean.copy_(mean)
        running_var.copy_(var)
        if num_batches_tracked is not None:
            num_batches_tracked.fill_(batches)
