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

Collectives pair up by order: every rank of the group must run the same
synchronized layers in the same order and the same way, or they would merge
one layer's statistics with another's, hang, or (different sizes) abort the
process. A layer's :func:`fingerprint` (its name, channels and mode) rides in
every statistics collective, so ranks that disagree raise instead, at no
extra collective; before a layer's first one (where ranks that disagree
could pair collectives of different sizes) :func:`check_agreement` compares
the fingerprints with one small collective of fixed size. A collective that
fails (a timeout: a rank that never came) is re-raised naming the layer whose
forward or backward made it.
"""

from __future__ import annotations

import zlib
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from .stats import BatchStats  # (stats imports this module)

__all__ = ["GlobalStats", "across_ranks", "active", "check_agreement", "fingerprint", "gather_rows", "layer",
           "merge_rows", "stats_dtype", "sync_normalize"]

layer: ContextVar[str | None] = ContextVar("bnctl_synchronized_layer", default=None)
"""The name of the layer whose synchronized forward runs now (set by the layer around it): a collective
that fails says which layer made it; the backward's names the layer its forward ran in."""


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
    _all_reduce(table, group, layer.get(), "forward")
    return table


def _all_reduce(table: Tensor, group: Any, name: str | None, where: str) -> None:
    """``dist.all_reduce`` (a sum, in place); one that fails inside layer ``name``'s synchronized ``where``
    (forward or backward) is re-raised naming it."""
    try:
        dist.all_reduce(table, group=group)
    except RuntimeError as err:
        if name is None:
            raise
        raise RuntimeError(
            f"{name}: expected every rank of the process group to join this layer's synchronized BatchNorm "
            f"{where}, got an error from the collective: {str(err).strip()}. Collectives pair up by order, so "
            "a rank that runs another synchronized layer or none here (a data-dependent branch, a policy or "
            "train()/eval() set on some ranks only) leaves the others waiting. Fix: run the same synchronized "
            "layers in the same order with the same policy and mode on every rank, or give the layers only some "
            "ranks run a policy with sync=False."
        ) from err


class _AllReduce(torch.autograd.Function):
    """A summing ``all_reduce`` whose backward is the same ``all_reduce`` of the gradients."""

    @staticmethod
    def forward(ctx: Any, table: Tensor, group: Any) -> Tensor:
        ctx.group, ctx.name = group, layer.get()
        table = table.clone()
        _all_reduce(table, group, ctx.name, "forward")
        return table

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        _all_reduce(grad, ctx.group, ctx.name, "backward")
        return grad, None


_NORMALIZE = ("batch", "running", "renorm", "blend")  # bnctl.policy's BATCH, RUNNING, RENORM, BLEND
_UPDATE = ("none", "ema", "cumulative")  # NO_UPDATE, EMA, CUMULATIVE
_NAME_FLOATS, _NAME_BYTES = 10, 6  # a name's last 60 UTF-8 bytes, 6 a float64 (exact below 2**53)


def fingerprint(name: str, channels: int, normalize: int, update: int, momentum: float | None, alpha: float,
                device: torch.device) -> Tensor:
    """What every rank must agree on in a synchronized forward, as 16 float64 values (exact): the
    layer (a CRC of its name in the model and the name's last 60 bytes), its number of channels, its
    ``normalize`` and ``update`` kinds (:data:`bnctl.policy.BATCH`, ...; :data:`bnctl.policy.EMA`, ...),
    momentum and blend weight."""
    tail = name.encode()[-_NAME_FLOATS * _NAME_BYTES:].rjust(_NAME_FLOATS * _NAME_BYTES, b"\0")
    packed = [float(int.from_bytes(tail[i:i + _NAME_BYTES], "big")) for i in range(0, len(tail), _NAME_BYTES)]
    values = [float(zlib.crc32(name.encode())), float(channels), float(normalize), float(update),
              -1.0 if momentum is None else float(momentum), float(alpha), *packed]
    return torch.tensor(values, dtype=torch.float64, device=device)


def check_agreement(group: Any, name: str, tag: Tensor) -> None:
    """Raise on every rank of ``group`` unless all of them have the same :func:`fingerprint` ``tag``: one small
    collective, of the same size whatever the layer (two layers' checks pair up without aborting the process,
    which two layers' statistics of different sizes would). Every rank that raises has made the same
    collectives, so the group stays usable.

    Raises:
        RuntimeError: on every rank, naming the layer, each rank's layer and mode, and what differs.
    """
    rows = gather_rows(tag, group).tolist()
    if any(row != rows[0] for row in rows):
        _disagree(group, name, rows)


def _disagree(group: Any, name: str, rows: list[list[float]]) -> None:
    differs = [what for what, cols in (("layer", [0]), ("channels", [1]), ("mode", [2, 3, 4, 5]))
               if any([row[c] for c in cols] != [rows[0][c] for c in cols] for row in rows)]
    world = group is None or group is dist.group.WORLD
    ranks = "; ".join(f"rank {r if world else dist.get_global_rank(group, r)} runs {_describe(row)}"
                      for r, row in enumerate(rows))
    raise RuntimeError(
        f"{name}: ranks disagree on the synchronized BatchNorm forward (different {' and '.join(differs)}): {ranks}. "
        "Collectives pair up by order, so the ranks would merge different layers' statistics, wait for each "
        "other until a timeout, or abort. Fix: run the same synchronized layers in the same order on every "
        "rank, with the same policy (bnctl.apply alike on every rank) and mode (train()/eval() on every "
        "rank); give the layers of a branch that only some ranks take a policy with sync=False."
    )


def _describe(row: list[float]) -> str:
    tail = b"".join(int(f).to_bytes(_NAME_BYTES, "big") for f in row[6:]).lstrip(b"\0")
    name = ("..." if len(tail) == _NAME_FLOATS * _NAME_BYTES else "") + tail.decode(errors="replace")
    normalize, update = _NORMALIZE[int(row[2])], _UPDATE[int(row[3])]
    if normalize == "blend":
        normalize = f"blend {row[5]:g}"
    momentum = "None" if row[4] == -1.0 else f"{row[4]:g}"
    return f"{name} with {int(row[1])} channels in mode ({normalize}, {update}, momentum {momentum})"


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


def across_ranks(mean: Tensor, var: Tensor, n: int, group: Any = None, tag: Tensor | None = None,
                 name: str = "") -> GlobalStats:
    """This rank's per-channel mean and biased variance over ``n`` values merged with every other
    rank's (each rank's own from :func:`bnctl.functional.batch_stats`; ``n`` may be 0): the union's
    statistics, in float64, the same on every rank. One collective; every rank must call it. No
    gradient.

    ``tag``: this rank's :func:`fingerprint` of layer ``name``, carried in the same collective and compared
    with every rank's (as :func:`check_agreement`, without a collective of its own).

    Raises:
        RuntimeError: ``tag`` differs between ranks (on every rank whose collective paired with this one).
    """
    channels = mean.numel()
    with torch.no_grad():
        mean, m2 = mean.to(torch.float64), var.to(torch.float64) * n
        row = torch.stack([torch.full_like(mean, float(n)), mean, m2])
        if tag is None:
            counts, means, m2s = gather_rows(row, group).unbind(1)
        else:
            table = gather_rows(torch.cat([row.flatten(), tag]), group)
            counts, means, m2s = table[:, :3 * channels].unflatten(1, (3, channels)).unbind(1)
        total, mean_g, m2_g = merge_rows(counts, means, m2s)
    if tag is None:
        count = int(total[0]) if total.numel() else 0  # equal over channels; one host read
    else:  # one host read: the count and every rank's tag
        head = min(channels, 1)
        read = torch.cat([total[:head], table[:, 3 * channels:].flatten()]).tolist()
        count, tags = int(read[0]) if head else 0, read[head:]
        rows = [tags[i:i + tag.numel()] for i in range(0, len(tags), tag.numel())]
        if any(r != rows[0] for r in rows):
            _disagree(group, name, rows)
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
                group: Any, stats: GlobalStats | BatchStats) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mean, var = stats.mean, stats.var
        if alpha != 1.0:  # a blend, which reads running statistics: the batch rules choose it only with them
            mean = alpha * mean + (1.0 - alpha) * running_mean.to(torch.float64)  # type: ignore[union-attr]
            var = alpha * var + (1.0 - alpha) * running_var.to(torch.float64)  # type: ignore[union-attr]
        dtype = stats_dtype(x, weight)
        mean, var = mean.to(dtype), var.to(dtype)
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, var, stats.mean.to(dtype))
        ctx.alpha, ctx.eps, ctx.group, ctx.n, ctx.name = alpha, eps, group, stats.n, layer.get()
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
        _all_reduce(sums, ctx.group, ctx.name, "backward")
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
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: Any, stats: GlobalStats | BatchStats, *,
    alpha: float = 1.0, running_mean: Tensor | None = None, running_var: Tensor | None = None,
) -> tuple[Tensor, GlobalStats]:
    """``x`` normalized with ``stats``, the statistics of every rank's batch (:func:`across_ranks` of
    this ``x``), blended with the running ones for ``alpha < 1``; and those statistics. The backward
    makes one collective."""
    y, mean, var, count = _SyncNormalize.apply(x, weight, bias, alpha, running_mean, running_var, eps, group,
                                               stats)
    return y, GlobalStats(mean, var, int(count))
