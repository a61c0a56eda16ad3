"""The functional core: batch statistics, normalization, update rules.

Everything here computes and returns values; nothing decides where they go.
The layers (:mod:`bnctl.modules` with :mod:`bnctl.state`) choose what a
forward does and commit the values, as Flax's ``BatchNorm.__call__`` does.
:func:`batch_norm` composes the same pieces for callers without a layer.

Conventions (SPEC section 1, stated once in the README): for ``x`` of shape
``(N, C, *)`` a channel's statistics use ``n = N * prod(*)`` values;
normalization uses the biased variance; running updates store the unbiased
variance ``var_B * n / (n - 1)``; the EMA momentum ``m`` is the weight of the
new batch:

.. math::

    \\mathrm{running\\_mean} \\leftarrow (1 - m)\\,\\mathrm{running\\_mean} + m\\,\\mu_B, \\qquad
    \\mathrm{running\\_var} \\leftarrow (1 - m)\\,\\mathrm{running\\_var} + m\\,\\sigma^2_B\\,\\frac{n}{n-1}

Non-finite values are never written: :func:`copy_if_finite_` writes all new
values or none, without a host synchronization on devices (on CUDA with
Triton, :func:`write_running_` does an EMA update in one fused kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .autograd import normalize_with_stats, reduce_dims
from .distributed import across_ranks, gather_rows, merge_rows, stats_dtype, sync_normalize
from .policy import Mode, Normalize, Step, make_step

__all__ = [
    "Accumulator",
    "BatchAverage",
    "BatchStats",
    "Status",
    "batch_norm",
    "batched",
    "batch_stats",
    "check_eps",
    "copy_if_finite_",
    "ema",
    "ema_weight",
    "exporting",
    "global_stats",
    "new_running_values",
    "normalize",
    "normalize_and_observe",
    "population",
    "renorm_limits",
    "step_for_batch",
    "traced",
    "transformed",
    "write_running_",
]


class BatchStats(NamedTuple):
    """One batch's per-channel statistics: mean, biased variance, values per channel."""

    mean: Tensor
    var: Tensor
    n: int


Observed = Union[BatchStats, Tensor]
"""What a forward observed of its batch: its statistics, or the new EMA values ``(2, C)``."""

Status = Union[bool, Tensor]
"""Whether new values were written: a bool on the CPU, a 0-dim bool tensor elsewhere."""

Limits = tuple[Union[Tensor, float], Union[Tensor, float]]


def traced() -> bool:
    """Whether this code runs traced or transformed: ``torch.compile``, ``torch.export``,
    ``torch.jit.trace``, or a ``torch.func`` transform (``vmap``, ``grad``). Then bnctl takes no
    branch on a tensor's value (the graph would bake it in) and changes no Python state."""
    return torch.compiler.is_compiling() or exporting() or transformed()


def exporting() -> bool:
    """Whether this code runs under ``torch.export`` (ONNX's default exporter included) or
    ``torch.jit.trace`` (ONNX's TorchScript exporter)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is active."""
    return torch._C._are_functorch_transforms_active()


def batched(t: Tensor) -> bool:
    """Whether ``t`` is seen through ``torch.func.vmap`` (one slice per vmapped model or sample)."""
    return torch._C._functorch.is_batchedtensor(t)


def values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


def batch_stats(x: Tensor) -> BatchStats:
    """Per-channel mean and biased variance of ``x`` (no gradient), at native speed.

    Uses :func:`torch.batch_norm_update_stats` without buffers. Inputs of
    lower precision than float32 are reduced in float32.

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
        elif exporting() or transformed():  # an op every exporter knows, with a vmap batching rule
            var, mean = torch.var_mean(xs, reduce_dims(x.dim()), unbiased=False)
        else:
            mean, var = torch.batch_norm_update_stats(xs, None, None, 0.0)
    return BatchStats(mean, var, values_per_channel(x))


def global_stats(x: Tensor, group: Any = None) -> BatchStats:
    """:func:`batch_stats` of the union of every rank's ``x`` in ``group`` (float64; one collective,
    which every rank must make, also with an empty ``x``)."""
    return BatchStats(*across_ranks(*batch_stats(x), group))


# -- which statistics normalize ------------------------------------------------------------


def _one_value_error(x: Tensor, layer: str) -> ValueError:
    return ValueError(
        f"{layer}: expected more than 1 value per channel to compute batch statistics, got "
        f"input of shape {tuple(x.shape)}. Fixes: use a policy that normalizes with running "
        "statistics in this mode (e.g. 'frozen' or 'frozen_stats'), use a larger batch, pass "
        "drop_last=True to the DataLoader, or use a policy with fallback=True to normalize such "
        "batches with the running statistics."
    )


def step_for_batch(step: Step, x: Tensor, eps: float, has_running_stats: bool, layer: str) -> Step:
    """``step`` adjusted to the batch ``x``: the rules that depend on the batch.

    * An empty batch (``N = 0``) updates nothing.
    * One value per channel has no batch variance: a mode that needs batch
      statistics raises (naming ``layer``), or with ``step.fallback``
      normalizes with the running statistics and updates nothing. (With
      running normalization an update is still attempted: its unbiased
      variance is undefined, so the guard skips it and the skip is counted.)
    * ``eps`` must be positive (recent PyTorch refuses anything else; here
      the error names the layer).

    Raises:
        ValueError: one value per channel where batch statistics are needed,
            or ``eps <= 0``.
    """
    n = values_per_channel(x)
    if n == 0:
        normalize = "running" if step.normalize == "running" else "batch"
        step = step._replace(normalize=normalize, update="none")
    elif n == 1 and step.normalize != "running":
        if not (step.fallback and has_running_stats):
            raise _one_value_error(x, layer)
        step = step._replace(normalize="running", update="none")
    check_eps(eps, layer)
    return step


def check_eps(eps: float, layer: str) -> None:
    """Raise, naming ``layer``, unless ``eps > 0`` (recent PyTorch refuses anything else)."""
    if not eps > 0:
        raise ValueError(
            f"{layer}: expected eps > 0, got eps={eps!r}. Set the layer's eps to a small positive "
            "number (PyTorch's default is 1e-5)."
        )


def _running(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
             eps: float, *, updated_next: bool = False) -> Tensor:
    """PyTorch's eval kernel, forward and backward (measured faster on the CPU than a
    scale-and-shift formulation, see benchmarks/). With ``updated_next`` (this forward updates
    the statistics right after), autograd gets one copy of both, so backward uses the values
    from before the update (SPEC section 3)."""
    if updated_next and torch.is_grad_enabled():
        mean, var = _snapshot(mean, var)
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


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


def _snapshot(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Copies of running statistics that this forward updates next, for autograd to keep."""
    if torch.compiler.is_compiling() and not exporting():  # (an exported program stays free of bnctl ops)
        return _opaque_snapshot(mean, var)
    mean, var = torch.stack([mean, var]).unbind()
    return mean, var


def renorm_limits(
    rmax: float, dmax: float, warmup: tuple[int, int], step: Tensor | None
) -> Limits:
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
    x: Tensor, stats: BatchStats, running_mean: Tensor, running_var: Tensor,
    weight: Tensor | None, bias: Tensor | None, eps: float, limits: Limits,
) -> Tensor:
    """Batch Renormalization (Ioffe 2017) forward; ``r`` and ``d`` are constants in backward.

    ``y = w * (x_hat_B * r + d) + b`` equals native batch-statistics BatchNorm
    with weight ``w * r`` and bias ``b + w * d``, so forward and backward run
    at native speed and the gradient through ``mean_B``/``var_B`` is exact.
    """
    with torch.no_grad():
        r, d = _renorm_factors(stats, running_mean, running_var, eps, limits)
    w = r if weight is None else weight * r
    b = d if weight is None else weight * d
    if bias is not None:
        b = b + bias
    return F.batch_norm(x, None, None, w, b, True, 0.0, eps)


def _renorm_factors(
    stats: BatchStats, running_mean: Tensor, running_var: Tensor, eps: float, limits: Limits
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's clipped ``r = sigma_B / sigma`` and ``d = (mu_B - mu) / sigma``."""
    rmax, dmax = limits
    running_std = torch.sqrt(running_var + eps)
    r = torch.sqrt(stats.var + eps) / running_std
    r = torch.minimum(torch.maximum(r, 1.0 / torch.as_tensor(rmax)), torch.as_tensor(rmax))
    d = (stats.mean - running_mean) / running_std
    d = torch.minimum(torch.maximum(d, -torch.as_tensor(dmax)), torch.as_tensor(dmax))
    return r, d


def _blend(
    x: Tensor, alpha: float, running_mean: Tensor, running_var: Tensor,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> tuple[Tensor, BatchStats]:
    """``alpha * batch + (1 - alpha) * running`` statistics, gradient through the batch part."""
    var_b, mean_b = torch.var_mean(x, reduce_dims(x.dim()), unbiased=False)
    mean = alpha * mean_b + (1.0 - alpha) * running_mean
    var = alpha * var_b + (1.0 - alpha) * running_var
    out = normalize_with_stats(x, mean, var, weight, bias, eps)
    return out, BatchStats(mean_b.detach(), var_b.detach(), values_per_channel(x))


def normalize(
    x: Tensor,
    how: Normalize,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    limits: Limits = (3.0, 5.0),
    *,
    group: Any = None,
    fallback: bool = False,
) -> Tensor:
    """``x`` normalized with the statistics ``how`` names, then scaled and shifted.

    ``how`` is ``"batch"``, ``"running"``, ``"renorm"`` (with ``limits``
    ``(r_max, d_max)``) or a blend weight. Nothing is observed or updated;
    the running statistics are constants, given to PyTorch's kernel as they
    are (as ``torch.nn.BatchNorm*d`` in eval() does). With a process
    ``group``, batch statistics are those of every rank's batch together
    (``fallback``: with one value per channel over all ranks, the running
    statistics normalize instead of raising).
    """
    if group is not None and how != "running":
        return _synced(x, how, running_mean, running_var, weight, bias, eps, limits, group, observe=False,
                       fallback=fallback)[0]
    if how == "batch":
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if how == "running":
        return _running(x, running_mean, running_var, weight, bias, eps)
    return normalize_and_observe(x, how, running_mean, running_var, weight, bias, eps, limits=limits)[0]


def normalize_and_observe(
    x: Tensor,
    how: Normalize,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    limits: Limits = (3.0, 5.0),
    ema_weight: float | None = None,
    group: Any = None,
    fallback: bool = False,
) -> tuple[Tensor, Observed]:
    """:func:`normalize`, also returning what the batch says about the running statistics.

    The second value is this batch's :class:`BatchStats`, or, when
    ``how="batch"`` and an ``ema_weight`` is given, the new EMA running values
    ``[mean; var]`` as a ``(2, C)`` tensor computed by PyTorch's own training
    kernel (bit-identical to ``torch.nn.BatchNorm*d``). The running statistics
    are only read, and only copies of them reach autograd (the caller updates
    them next); their dtype is the dtype of the observed statistics.

    With a process ``group`` (``torch.distributed``), the batch is the union
    of every rank's ``x``: normalization, its gradient and the observed
    statistics are those of that union (:mod:`bnctl.distributed`), identical
    on every rank; ``ema_weight`` is then ignored. With ``fallback``, one
    value per channel over all ranks normalizes with the running statistics
    and observes an empty batch (nothing is written) instead of raising.
    """
    if group is not None:
        return _synced(x, how, running_mean, running_var, weight, bias, eps, limits, group, observe=True,
                       fallback=fallback)
    if how == "batch":
        if ema_weight is not None:
            new = torch.stack([running_mean, running_var])  # updated by the kernel, returned
            return F.batch_norm(x, new[0], new[1], weight, bias, True, ema_weight, eps), new
        if exporting():  # exporters read the kernel's buffers as statistics to normalize with
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps), batch_stats(x)
        # One native pass gives the output and, through buffers that start at zero and get
        # momentum 1, this batch's mean and unbiased variance.
        mean_b, var_b = torch.zeros_like(running_mean), torch.zeros_like(running_var)
        out = F.batch_norm(x, mean_b, var_b, weight, bias, True, 1.0, eps)
        n = values_per_channel(x)
        return out, BatchStats(mean_b, var_b * ((n - 1) / n), n)
    if how == "running":
        return _running(x, running_mean, running_var, weight, bias, eps, updated_next=True), batch_stats(x)
    if how == "renorm":
        stats = batch_stats(x)
        return _renorm(x, stats, running_mean, running_var, weight, bias, eps, limits), stats
    return _blend(x, float(how), running_mean, running_var, weight, bias, eps)


def _synced(
    x: Tensor, how: Normalize, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float, limits: Limits, group: Any, *, observe: bool, fallback: bool,
) -> tuple[Tensor, Observed]:
    """:func:`normalize_and_observe` over the union of every rank's batch (one collective forward,
    one in backward; none when normalizing with running statistics and observing nothing)."""
    if how == "running":
        out = _running(x, running_mean, running_var, weight, bias, eps, updated_next=observe)
        if not observe:
            return out, x.new_empty(0)
        return out, global_stats(x, group)
    stats = global_stats(x, group)
    if stats.n == 1:  # every rank sees the same count, so every rank takes the same branch
        if fallback and running_mean is not None:  # running statistics for this batch; nothing written
            return _running(x, running_mean, running_var, weight, bias, eps), stats._replace(n=0)
        raise ValueError(
            "expected more than 1 value per channel over all ranks to compute batch statistics, got 1. "
            "Use larger batches, a policy with fallback=True, or one that normalizes with running statistics."
        )
    if how == "renorm":
        with torch.no_grad():
            r, d = _renorm_factors(stats, running_mean, running_var, eps, limits)
        r, d = (t.to(stats_dtype(x, weight)) for t in (r, d))
        w, b = (r, d) if weight is None else (weight * r, weight * d)
        out, _ = sync_normalize(x, w, b if bias is None else b + bias, eps, group, stats)
    else:
        alpha = 1.0 if how == "batch" else float(how)
        out, _ = sync_normalize(x, weight, bias, eps, group, stats, alpha=alpha, running_mean=running_mean,
                                running_var=running_var)
    return out, stats


# -- update rules: new values, written by the caller ---------------------------------------


def ema_weight(momentum: float | None, num_batches_tracked: Tensor | None) -> float | Tensor:
    """EMA weight of the new batch; ``momentum=None`` is PyTorch's cumulative average.

    That average's weight depends on ``num_batches_tracked``: a Python float
    as PyTorch computes it, or, while traced (compile, export), a tensor, so
    that reading it neither synchronizes nor is baked into the graph.
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None.")
    if traced():
        return 1.0 / (num_batches_tracked + 1).to(torch.float64)
    # Same float as PyTorch's `num_batches_tracked.add_(1); 1.0 / float(num_batches_tracked)`.
    return 1.0 / float(num_batches_tracked + 1)


def _unbiased(stats: BatchStats) -> Tensor:
    """The batch's unbiased variance; undefined (NaN) for one value per channel."""
    return stats.var * (stats.n / (stats.n - 1) if stats.n > 1 else math.nan)


def ema(running_mean: Tensor, running_var: Tensor, stats: BatchStats, weight: float | Tensor) -> Tensor:
    """New running ``[mean; var]`` as a ``(2, C)`` tensor: the EMA with this batch.

    Example:
        >>> stats = BatchStats(torch.full((2,), 4.0), torch.full((2,), 3.0), 4)
        >>> ema(torch.zeros(2), torch.ones(2), stats, 0.5)
        tensor([[2.0000, 2.0000],
                [2.5000, 2.5000]])
    """
    current = torch.stack([running_mean, running_var])
    batch = torch.stack([stats.mean, _unbiased(stats)]).to(current.dtype)
    if isinstance(weight, Tensor):
        weight = weight.to(current.dtype)
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
        var = self.var + (_unbiased(stats).to(torch.float64) - self.var) / batches
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
    update: str,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    observed: Observed,
    momentum: float | None,
    accumulator: Accumulator | None = None,
) -> tuple[list[Tensor], Tensor]:
    """The tensors an ``update`` writes and their new values, flat, for :func:`copy_if_finite_`.

    ``"ema"``: the running statistics, by the EMA formula (or as observed by
    the native kernel). ``"cumulative"``: ``accumulator`` merged with the
    batch, and the running statistics set to its population statistics.
    """
    if update == "ema":
        if isinstance(observed, BatchStats):
            observed = ema(running_mean, running_var, observed, ema_weight(momentum, num_batches_tracked))
        return [running_mean, running_var], observed.reshape(-1)
    if update == "cumulative" and accumulator is not None and isinstance(observed, BatchStats):
        merged = accumulator.merged(observed)
        mean, var = population(*merged[:3])
        return [*accumulator.tensors, running_mean, running_var], torch.cat([*merged, mean, var])
    raise ValueError(
        f"expected update 'ema', or 'cumulative' with an Accumulator and batch statistics, got "
        f"{update!r} with {type(accumulator).__name__}."
    )


# -- the guard ------------------------------------------------------------------------------


def write_running_(
    update: str,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    observed: Observed,
    momentum: float | None,
    accumulator: Accumulator | None = None,
    *,
    counter: Tensor | None = None,
) -> Status:
    """One guarded running update: :func:`new_running_values` written by :func:`copy_if_finite_`.

    On CUDA, with Triton, an EMA update runs as one fused kernel
    (:func:`bnctl.kernels.ema_if_finite_`: the same values, guard and
    counters in one launch); everywhere else the composed ops run.
    ``counter`` (a 0-dim int64 tensor) is also incremented when the values are written.
    """
    if update == "ema" and not traced():
        fused = _fused_ema_args(running_mean, running_var, num_batches_tracked, observed, momentum, counter)
        if fused is not None:
            ok = kernels.ema_if_finite_(running_mean, running_var, *fused, counters=(num_batches_tracked, counter))
            if ok is not None:
                return ok
    targets, values = new_running_values(
        update, running_mean, running_var, num_batches_tracked, observed, momentum, accumulator
    )
    return copy_if_finite_(targets, values, num_batches_tracked, counter=counter)


def _fused_ema_args(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None, observed: Observed,
    momentum: float | None, counter: Tensor | None,
) -> tuple[Tensor, Tensor, float | None, float] | None:
    """``(new_mean, new_var, weight, var_factor)`` for the fused kernel, or None where it does not apply."""
    if not kernels.usable(running_mean):  # (the cheap test first: False on the CPU)
        return None
    if isinstance(observed, BatchStats):
        if observed.n == 0:
            return None
        new_mean, new_var = observed.mean, observed.var
    elif observed.dim() == 2 and len(observed) == 2:
        new_mean, new_var = observed[0], observed[1]
    else:
        return None
    if not kernels.applies(running_mean, running_var, new_mean, new_var, (num_batches_tracked, counter)):
        return None
    if isinstance(observed, BatchStats):
        factor = observed.n / (observed.n - 1) if observed.n > 1 else math.nan
        return new_mean, new_var, float(ema_weight(momentum, num_batches_tracked)), factor
    return new_mean, new_var, None, 1.0


def copy_if_finite_(
    targets: list[Tensor], values: Tensor, num_batches_tracked: Tensor | None, *, counter: Tensor | None = None
) -> Status:
    """Copy ``values`` into ``targets``, all or none: none if any value is non-finite.

    ``values`` is the flat concatenation of the new values, in the order of
    ``targets``; ``num_batches_tracked`` (if given) is incremented when they
    are written, and so is ``counter`` (a 0-dim int64 tensor, if given). One
    float64 sum over all of them, as rounded to their targets' dtypes, decides
    (so values large enough to overflow float64 count as non-finite too). On the CPU the
    check branches in Python (free there); on other devices, and wherever
    the code is :func:`traced` (compiled, exported, ``jit.trace``, ``vmap``),
    it is a masked copy, so no forward waits for the device and no graph
    bakes in the outcome of one batch.

    ``targets`` are written as PyTorch's own BatchNorm kernel writes its
    running statistics: without an autograd version bump, so a graph that
    saved them (an earlier eval-mode forward) keeps working and, as in
    PyTorch, reads the new values in its backward. (Traced code writes them
    with a plain ``copy_``, which the tracers and transforms understand.)
    """
    values = values.detach()  # (jit.trace does not record no_grad; it records detach)
    counters = [c for c in (num_batches_tracked, counter) if c is not None]
    with torch.no_grad():
        if any(t.dtype != values.dtype for t in targets):  # check what is written: a narrower buffer
            chunks = values.split([t.numel() for t in targets])  # can round a finite value to inf
            values = torch.cat([c.to(t.dtype).to(values.dtype) if t.is_floating_point() else c
                                for c, t in zip(chunks, targets)])
        if traced():
            return _copy_if_finite_device(targets, values, counters, data=False)
        if targets[0].device.type == "cpu":
            return _copy_if_finite_host(targets, values, counters)
        return _copy_if_finite_device(targets, values, counters)


def _copy_if_finite_host(targets: list[Tensor], values: Tensor, counters: list[Tensor]) -> bool:
    ok = math.isfinite(float(values.sum(dtype=torch.float64)))
    if ok:
        for target, new in zip(targets, values.split([t.numel() for t in targets])):
            target.data.copy_(new.view_as(target))
        for c in counters:
            c.add_(1)
    return ok


def _copy_if_finite_device(targets: list[Tensor], values: Tensor, counters: list[Tensor], data: bool = True) -> Tensor:
    flag = (values.sum(dtype=torch.float64) * 0) == 0  # False for inf and nan
    current = torch.cat([t.reshape(-1).to(values.dtype) for t in targets])
    merged = torch.where(flag, values, current)
    news = [m.view_as(t) for m, t in zip(merged.split([t.numel() for t in targets]), targets)]
    if data:
        torch._foreach_copy_([t.data for t in targets], news)  # one fused call
    else:  # traced: plain copies (vmap has no batching rule for the fused one)
        for target, new in zip(targets, news):
            target.copy_(new)
    for c in counters:
        c.add_(flag)
    return flag


# -- the whole step, for callers without a layer --------------------------------------------


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

    Args:
        x: input of shape ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` buffers or ``None``.
        weight, bias: ``(C,)`` affine parameters or ``None``.
        mode: a :class:`bnctl.Mode` or a :class:`bnctl.policy.Step`.
        momentum: EMA weight of the new batch; ``None`` for a cumulative
            average over ``num_batches_tracked``.
        eps: added to the variance.
        num_batches_tracked: incremented when the running statistics are updated.
        accumulator: the :class:`Accumulator` for ``update="cumulative"``.

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
    step = mode if isinstance(mode, Step) else make_step(Mode(*mode), momentum)
    has_running = running_mean is not None and running_var is not None
    if not has_running and (step.normalize != "batch" or step.update != "none"):
        raise ValueError(
            f"batch_norm: expected running statistics for mode {tuple(step[:2])}, got none. Pass "
            "running_mean and running_var, or use Mode('batch', 'none')."
        )
    step = step_for_batch(step, x, eps, has_running, "batch_norm")
    limits = renorm_limits(*step.renorm, num_batches_tracked) if step.renorm else (3.0, 5.0)
    if step.update == "none":
        return normalize(x, step.normalize, running_mean, running_var, weight, bias, eps, limits)
    weight_ema = ema_weight(step.momentum, num_batches_tracked) if step.update == "ema" else None
    out, observed = normalize_and_observe(
        x, step.normalize, running_mean, running_var, weight, bias, eps, limits=limits, ema_weight=weight_ema
    )
    write_running_(step.update, running_mean, running_var, num_batches_tracked, observed, step.momentum, accumulator)
    return out
