"""Normalization: ``x`` normalized with the statistics a forward chose, in one dispatcher.

:func:`normalize` is the only place that turns a decided forward into
PyTorch kernels (the running statistics through PyTorch's eval kernel, which
measured faster on the CPU than a scale-and-shift formulation): batch
statistics, running statistics, Batch Renormalization or a blend, locally or
over the ranks of a process group. What it learns of the batch for the
running statistics comes back as :class:`~bnctl.stats.BatchStats`, or, where
the normalization kernel computes the EMA itself in the same pass
(:func:`stages`), is written by that kernel into the tensors the caller
gives (``into=``: the buffers, which :func:`bnctl.guard.keep_if_finite_`
then checks, or a copy that :func:`bnctl.guard.write_staged_` writes back).
:func:`batch_norm` composes the whole step for callers without a layer.

Conventions (SPEC section 1): :mod:`bnctl.stats`.
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import context
from .autograd import normalize_constant_affine, normalize_with_stats
from .distributed import merge_rows, stats_dtype, sync_normalize
from .guard import Status, keep_if_finite_, write_running_, write_staged_
from .policy import (
    BATCH,
    BLEND,
    CUMULATIVE,
    EMA,
    GHOST,
    NO_UPDATE,
    RENORM,
    RUNNING,
    Mode,
    Step,
    check_eps,
    check_normalize,
    check_update,
    for_batch,
    kinds,
    make_step,
)
from .stats import Accumulator, BatchStats, batch_stats, ema_weight, reduce_dims, values_per_channel

__all__ = ["batch_norm", "normalize", "renorm_limits", "stages", "update_in_kernel"]

Limits = tuple[Union[Tensor, float], Union[Tensor, float]]


def normalize(
    x: Tensor,
    how: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    alpha: float = 1.0,
    limits: Limits | None = None,
    ghost: int | None = None,
    into: tuple[Tensor, Tensor] | None = None,
    momentum: float = 0.0,
    before: Tensor | None = None,
    observe: bool = False,
    group: Any = None,
    stats: BatchStats | None = None,
    ctx: int = context.EAGER,
) -> tuple[Tensor, BatchStats | None]:
    """``x`` normalized as ``how`` says, then scaled and shifted; and what was observed.

    Args:
        how: :data:`~bnctl.policy.BATCH`, ``RUNNING``, ``RENORM`` (with
            ``limits``, ``(r_max, d_max)``), ``BLEND`` (with ``alpha``, the
            weight of the batch statistics) or ``GHOST`` (each slice of
            ``ghost`` samples with its own batch statistics; observed: the
            whole batch's).
        running_mean, running_var: read before anything is written; when this
            forward updates them (``into`` or ``observe``) autograd gets copies
            of them (``before``, a ``(2, C)`` copy, where the caller has one),
            so backward uses the values from before the update (SPEC section 3).
        into: two ``(C,)`` tensors holding the running statistics (the buffers
            themselves, or a copy), which receive this batch's EMA update with
            weight ``momentum``, computed by the kernel that passes over ``x``
            anyway; only where :func:`stages`.
        observe: return this batch's :class:`~bnctl.stats.BatchStats`.
        group, stats: a process group and the statistics of every rank's
            batch in it (:func:`bnctl.stats.global_stats`): batch statistics
            are those, and so is their gradient (:mod:`bnctl.distributed`).
        ctx: where this runs (:func:`bnctl.context.current`).

    Returns:
        The output, of the shape and memory format of ``x``, and the batch's
        statistics when ``observe`` (``stats`` as given, when synchronized).
    """
    if how == RUNNING:  # running statistics exist: the batch rules normalize with them only then
        mean: Tensor = running_mean  # type: ignore[assignment]
        var: Tensor = running_var  # type: ignore[assignment]
        if ((into is not None or observe) and (x.requires_grad or weight is not None and weight.requires_grad)
                and torch.is_grad_enabled()):
            mean, var = before.unbind() if before is not None else _snapshot(mean, var, ctx)
        if (not ctx and (weight is None or not weight.requires_grad) and (bias is None or not bias.requires_grad)
                and x.requires_grad and not mean.requires_grad and torch.is_grad_enabled()):
            out = normalize_constant_affine(x, mean, var, weight, bias, eps)  # keeps per-channel tensors, not x
        else:
            out = _kernel(x, mean, var, weight, bias, False, 0.0, eps, ctx)
        if into is not None and ctx:  # captured: the training kernel, whose schema declares its writes (the
            torch.ops.aten._native_batch_norm_legit(x.detach(), None, None, into[0], into[1], True, momentum,
                                                    eps)  # stats kernel's does not: compilers would drop them)
        elif into is not None:  # the same arithmetic on the CPU, without an output
            torch.batch_norm_update_stats(x, into[0], into[1], momentum)
        elif observe and stats is None:
            stats = batch_stats(x, ctx)
        return out, stats
    if group is not None:  # a synchronized forward gives the statistics of every rank's batch (stats)
        out = _synced(x, how, running_mean, running_var, weight, bias, eps, alpha, limits, group,
                      stats)  # type: ignore[arg-type]
        return out, stats
    if how == GHOST:
        return _ghost(x, ghost, running_mean, weight, bias, eps, observe, ctx)  # type: ignore[arg-type]  # (GHOST: a size)
    if how == BATCH:
        if into is not None:
            return _kernel(x, into[0], into[1], weight, bias, True, momentum, eps, ctx), None
        if observe:  # observed for an update, which has running statistics (resolve_mode)
            return _batch_observed(x, running_mean, weight, bias, eps, ctx)  # type: ignore[arg-type]
        return _kernel(x, None, None, weight, bias, True, 0.0, eps, ctx), None
    if how == RENORM:  # (renorm and blend read running statistics: the batch rules choose them only then)
        stats = batch_stats(x, ctx)
        with torch.no_grad():
            r, d = _renorm_factors(stats, running_mean, running_var, eps, limits)  # type: ignore[arg-type]
        w, b = _renorm_affine(r, d, weight, bias)
        if into is not None:  # the kernel normalizes with the batch's statistics and updates `into`
            return _kernel(x, into[0], into[1], w, b, True, momentum, eps, ctx), None
        return _kernel(x, None, None, w, b, True, 0.0, eps, ctx), stats if observe else None
    return _blend(x, alpha, running_mean, running_var, weight, bias, eps, observe, ctx)  # type: ignore[arg-type]


def stages(how: int, momentum: float | None, ctx: int) -> bool:
    """Whether :func:`normalize` computes an EMA update with ``momentum`` itself (``into=``).

    PyTorch's kernels update running statistics in the pass that normalizes
    (batch statistics, Batch Renormalization) or reduces (running statistics)
    anyway; a blend computes its statistics with differentiable ops instead,
    ghost batches merge theirs from the slices'.
    The kernels take a float weight (``momentum=None`` has one only eagerly)
    and write into their buffers, which ``vmap`` cannot batch.
    """
    return not (how in (BLEND, GHOST) or ctx & context.TRANSFORMED or (momentum is None and ctx != context.EAGER))


def update_in_kernel(args: tuple, limits: Limits | None, momentum: float, num_batches_tracked: Tensor | None,
                     ctx: int, counter: Tensor | None = None, write: bool = True) -> tuple[Tensor, Status]:
    """:func:`normalize` whose kernel also computes the EMA update (where :func:`stages`), guarded.

    ``args`` are :func:`normalize`'s positional arguments. One copy of the running statistics is made:
    eagerly on the CPU the kernel updates the buffers in place, as PyTorch's does (bit-identical, no
    write back), and the copy restores them if a new value is not finite
    (:func:`bnctl.guard.keep_if_finite_`); elsewhere the kernel updates the copy, which the guard
    writes back all or nothing without waiting for the device (:func:`bnctl.guard.write_staged_`).
    The copy is also what autograd keeps of the statistics a running normalization used. Without
    ``write`` (an activation checkpoint's recomputation) the same ops run on the copy, and nothing is written.
    """
    running_mean, running_var = args[2], args[3]
    backup = torch.stack([running_mean, running_var])
    if not write:
        return normalize(*args, limits=limits, into=(backup[0], backup[1]), momentum=momentum, ctx=ctx)[0], False
    if not ctx and running_mean.is_cpu and running_mean.dtype is running_var.dtype:
        out, _ = normalize(*args, limits=limits, into=(running_mean, running_var), momentum=momentum, before=backup,
                           ctx=ctx)
        return out, keep_if_finite_(running_mean, running_var, num_batches_tracked, backup)
    out, _ = normalize(*args, limits=limits, into=(backup[0], backup[1]), momentum=momentum, ctx=ctx)
    return out, write_staged_(running_mean, running_var, num_batches_tracked, backup, counter=counter, ctx=ctx)


def _kernel(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
            bias: Tensor | None, training: bool, momentum: float, eps: float, ctx: int) -> Tensor:
    """PyTorch's BatchNorm kernel, as ``F.batch_norm`` calls it (eagerly without its Python checks, which
    the batch rules made already; captured code gets ``F.batch_norm``, which every tracer knows)."""
    if ctx:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps,
                            torch._C._get_cudnn_enabled())


@torch.library.custom_op("bnctl::snapshot", mutates_args=())
def _opaque_snapshot(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Copies of ``mean`` and ``var`` that a compiled graph cannot see into.

    Inductor's min-cut partitioner may recompute a cheap read of a buffer in
    backward, after the same forward updated that buffer in place: backward
    would then see the new statistics (silently wrong gradients). A custom op
    is not recomputed, so backward gets the values from before the update.
    """
    return mean.clone(), var.clone()


@_opaque_snapshot.register_fake
def _(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(mean), torch.empty_like(var)


def _snapshot(mean: Tensor, var: Tensor, ctx: int) -> tuple[Tensor, Tensor]:
    """Copies of running statistics that this forward updates next, for autograd to keep."""
    if ctx & context.COMPILING and not ctx & context.EXPORTING:  # (an exported program stays free of bnctl ops)
        return _opaque_snapshot(mean, var)
    both = torch.stack([mean, var])
    return both[0], both[1]


def _batch_observed(x: Tensor, running_mean: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                    ctx: int) -> tuple[Tensor, BatchStats]:
    """Batch-statistics normalization and the batch's statistics, in one native pass where it can."""
    if ctx & context.EXPORTING:  # exporters read the kernel's buffers as statistics to normalize with
        return _kernel(x, None, None, weight, bias, True, 0.0, eps, ctx), batch_stats(x, ctx)
    # Buffers that start at zero and get momentum 1 receive this batch's mean and unbiased variance.
    mean_b, var_b = torch.zeros_like(running_mean), torch.zeros_like(running_mean)
    out = _kernel(x, mean_b, var_b, weight, bias, True, 1.0, eps, ctx)
    n = values_per_channel(x)
    return out, BatchStats(mean_b, var_b * ((n - 1) / n), n)


def _ghost(x: Tensor, size: int, running_mean: Tensor | None, weight: Tensor | None, bias: Tensor | None,
           eps: float, observe: bool, ctx: int) -> tuple[Tensor, BatchStats | None]:
    """Ghost batch normalization: each consecutive slice of ``size`` samples normalized with its own batch
    statistics by PyTorch's kernel (so outputs and gradients are BatchNorm's, slice by slice), the outputs
    concatenated. Observed: the whole batch's mean and biased variance, merged from the statistics each
    slice's kernel computed (no second pass over ``x``; a loop over the slices measured faster on the CPU
    than one kernel call on a reshaped copy)."""
    parts = x.split(size)
    if not observe:
        return torch.cat([_kernel(p, None, None, weight, bias, True, 0.0, eps, ctx) for p in parts]), None
    if ctx & context.EXPORTING:  # (as in _batch_observed: exporters want statistics as ops)
        stats = [batch_stats(p, ctx) for p in parts]
        means, variances = torch.stack([s.mean for s in stats]), torch.stack([s.var for s in stats])
        out = torch.cat([_kernel(p, None, None, weight, bias, True, 0.0, eps, ctx) for p in parts])
    else:  # buffers that start at zero and get momentum 1 receive each slice's mean and unbiased variance
        # (observed for an update, which has running statistics: resolve_mode)
        means = torch.zeros((len(parts), x.shape[1]), dtype=running_mean.dtype,  # type: ignore[union-attr]
                            device=x.device)
        variances = torch.zeros_like(means)
        out = torch.cat([_kernel(p, means[i], variances[i], weight, bias, True, 1.0, eps, ctx)
                         for i, p in enumerate(parts)])
    n, samples = values_per_channel(x), x.shape[0]
    per_sample = n // samples if samples else 0
    counts = means.new_full((len(parts), 1), float(size * per_sample))  # values per channel of each slice
    counts[-1] = (samples - size * (len(parts) - 1)) * per_sample
    m2s = variances * (counts if ctx & context.EXPORTING else counts - 1)  # (the kernel's are unbiased)
    _, mean, m2 = merge_rows(counts, means, m2s)
    var = m2 / n
    return out, BatchStats(mean, var, n)


def renorm_limits(rmax: float, dmax: float, warmup: tuple[int, int], step: Tensor | None) -> Limits:
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


def _renorm_factors(
    stats: BatchStats, running_mean: Tensor, running_var: Tensor, eps: float, limits: Limits | None
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's clipped ``r = sigma_B / sigma`` and ``d = (mu_B - mu) / sigma``."""
    rmax, dmax = limits if limits is not None else (3.0, 5.0)
    running_std = torch.sqrt(running_var + eps)
    r = torch.sqrt(stats.var + eps) / running_std
    r = torch.minimum(torch.maximum(r, 1.0 / torch.as_tensor(rmax)), torch.as_tensor(rmax))
    d = (stats.mean - running_mean) / running_std
    d = torch.minimum(torch.maximum(d, -torch.as_tensor(dmax)), torch.as_tensor(dmax))
    return r, d


def _renorm_affine(r: Tensor, d: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Batch Renormalization (Ioffe 2017) as batch-statistics BatchNorm: ``y = w * (x_hat_B * r + d) + b`` is
    native BatchNorm with weight ``w * r`` and bias ``b + w * d`` (``r``, ``d`` constants in backward), so
    forward and backward run at native speed and the gradient through ``mean_B``/``var_B`` is exact."""
    w = r if weight is None else weight * r
    b = d if weight is None else weight * d
    return w, b if bias is None else b + bias


def _blend(
    x: Tensor, alpha: float, running_mean: Tensor, running_var: Tensor,
    weight: Tensor | None, bias: Tensor | None, eps: float, observe: bool, ctx: int = context.EAGER,
) -> tuple[Tensor, BatchStats | None]:
    """``alpha * batch + (1 - alpha) * running`` statistics, gradient through the batch part.

    Statistics of a float16/bfloat16 input are reduced in float32, as PyTorch's kernels reduce them."""
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    var_b, mean_b = torch.var_mean(xs, reduce_dims(x.dim()), unbiased=False)
    mean = (alpha * mean_b + (1.0 - alpha) * running_mean).to(running_mean.dtype)  # (the kernel takes the
    var = (alpha * var_b + (1.0 - alpha) * running_var).to(running_var.dtype)  # parameters' dtype)
    out = normalize_with_stats(x, mean, var, weight, bias, eps,
                               composed=bool(ctx & (context.EXPORTING | context.TRANSFORMED)))
    return out, BatchStats(mean_b.detach(), var_b.detach(), values_per_channel(x)) if observe else None


def _synced(
    x: Tensor, how: int, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, eps: float, alpha: float, limits: Limits | None, group: Any, stats: BatchStats,
) -> Tensor:
    """Normalization with the statistics of every rank's batch (one collective in backward)."""
    if how == RENORM:  # (renorm reads running statistics: the batch rules choose it only with them)
        with torch.no_grad():
            r, d = _renorm_factors(stats, running_mean, running_var, eps, limits)  # type: ignore[arg-type]
        r, d = (t.to(stats_dtype(x, weight)) for t in (r, d))
        w, b = _renorm_affine(r, d, weight, bias)
        return sync_normalize(x, w, b, eps, group, stats)[0]
    return sync_normalize(x, weight, bias, eps, group, stats, alpha=alpha if how == BLEND else 1.0,
                          running_mean=running_mean, running_var=running_var)[0]


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    mode: Mode | Step,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    accumulator: Accumulator | None = None,
) -> Tensor:
    """BatchNorm whose statistics and update are chosen explicitly by ``mode``.

    ``mode.normalize`` picks the statistics (``"batch"``, ``"running"``,
    ``"renorm"`` or a blend weight), ``mode.update`` what happens to
    ``running_mean``/``running_var``/``num_batches_tracked`` (updated in
    place, as :func:`torch.nn.functional.batch_norm` does).
    ``Mode("batch", "ema")`` is bit-identical to ``F.batch_norm(...,
    training=True)`` plus PyTorch's ``num_batches_tracked`` bookkeeping, except
    that non-finite statistics are never written. When the running statistics
    normalize and are also updated, normalization uses the values from before
    this batch. A :class:`bnctl.policy.Step` as ``mode`` also carries the
    momentum (overriding ``momentum``), the one-value fallback and the
    Batch Renormalization limits (default ``r_max=3, d_max=5``, no warm-up).
    The same batch rules, normalization and guard as a layer's forward.

    Args:
        x: input of shape ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` buffers or ``None``.
        weight, bias: ``(C,)`` affine parameters or ``None``.
        mode: a :class:`bnctl.Mode` or a :class:`bnctl.policy.Step`.
        momentum: EMA weight of the new batch; ``None`` for a cumulative
            average over ``num_batches_tracked``.
        eps: added to the variance.
        num_batches_tracked: incremented when the running statistics are updated.
        accumulator: the :class:`~bnctl.stats.Accumulator` for ``update="cumulative"``.

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
    step = _step_of(mode, momentum)
    if x.dim() < 2:
        raise ValueError(f"batch_norm: expected an input of shape (N, C, *), got shape {tuple(x.shape)}. Add the "
                         "batch dimension (x.unsqueeze(0)) or the channel dimension (x.unsqueeze(1)).")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != x.shape[1]:
            raise ValueError(f"batch_norm: expected {name} of {x.shape[1]} values (one per channel of the input of "
                             f"shape {tuple(x.shape)}), got {t.numel()}.")
    how, update = kinds(step)
    has_running = running_mean is not None and running_var is not None
    if not has_running and (how not in (BATCH, GHOST) or update != NO_UPDATE):
        raise ValueError(
            f"batch_norm: expected running statistics for mode {tuple(step[:2])}, got none. Pass "
            "running_mean and running_var, or use Mode('batch', 'none')."
        )
    if update == CUMULATIVE and accumulator is None:
        raise ValueError("batch_norm: expected an Accumulator for a cumulative update, got None. Pass "
                         "accumulator=bnctl.Accumulator.empty(num_features).")
    if how != RUNNING:
        check_eps(eps, "batch_norm")
    n = values_per_channel(x, step.ghost)
    due = update
    how, update = for_batch(how, update, n, fallback=step.fallback, has_running_stats=has_running, name="batch_norm",
                            got=batch_text(x, step.ghost))
    if n == 0 and due == EMA and num_batches_tracked is not None:  # counted, as nn.BatchNorm counts it
        num_batches_tracked.add_(1)
    ctx = context.current()
    limits = renorm_limits(*step.renorm, num_batches_tracked) if how == RENORM and step.renorm else None
    alpha = float(step.normalize) if how == BLEND else 1.0
    args = (x, how, running_mean, running_var, weight, bias, eps)
    if update == NO_UPDATE:
        return normalize(*args, alpha=alpha, limits=limits, ghost=step.ghost, ctx=ctx)[0]
    if update == EMA and stages(how, step.momentum, ctx):
        return update_in_kernel(args, limits, ema_weight(step.momentum, num_batches_tracked), num_batches_tracked,
                                ctx)[0]
    out, stats = normalize(*args, alpha=alpha, limits=limits, ghost=step.ghost, observe=True, ctx=ctx)
    # an update has running statistics (checked above) and observe=True gives stats
    write_running_(running_mean, running_var, num_batches_tracked, stats, step.momentum,  # type: ignore[arg-type]
                   accumulator if update == CUMULATIVE else None, ctx=ctx)
    return out


def batch_text(x: Tensor, ghost: int | None) -> str:
    """The batch, as the one-value rule's error describes it (:func:`bnctl.policy.for_batch`)."""
    if ghost and x.shape[0] > ghost:
        return (f"a last ghost batch of {x.shape[0] % ghost or ghost} of {x.shape[0]} samples (ghost={ghost}) of "
                f"input of shape {tuple(x.shape)}; a ghost size that divides the batch size avoids it")
    return f"input of shape {tuple(x.shape)}"


def _step_of(mode: Any, momentum: float | None) -> Step:
    """:func:`batch_norm`'s ``mode`` as a :class:`~bnctl.policy.Step`, or an error that says what a mode is."""
    if isinstance(mode, Step):
        return mode
    if not isinstance(mode, tuple) or len(mode) != 2:
        raise TypeError(f"batch_norm: expected mode=bnctl.Mode(normalize, update) or a bnctl.policy.Step, got "
                        f"{mode!r}. For example mode=bnctl.Mode('batch', 'ema').")
    mode = Mode(*mode)
    try:
        check_normalize(mode.normalize, "Mode.normalize")
        check_update(mode.update, "Mode.update")
    except ValueError as err:
        raise ValueError(f"batch_norm: {err}") from None
    return make_step(mode, momentum)

