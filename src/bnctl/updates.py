"""Controlled updates of running statistics: snapshots, pooled micro-batches, checkpointing.

* :func:`snapshot` / :func:`restore`: copies of every BatchNorm layer's
  statistics by qualified name, and back.
* :func:`accumulate`: statistics of several forwards (gradient-accumulation
  micro-batches, two forwards in one step) pooled and committed once, equal
  to one update with the pooled batch.
* :func:`checkpoint_context`: keeps ``torch.utils.checkpoint``'s recomputation
  from updating the statistics a second time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .apply import _controlled, batchnorm_layers, no_update
from .functional import Accumulator, commit_pooled_
from .modules import Pool, count_skip, domain_tensors, effective_momentum

__all__ = ["snapshot", "restore", "accumulate", "checkpoint_context"]

Snapshot = dict[str, dict[str, Tensor]]


def snapshot(model: nn.Module) -> Snapshot:
    """Copies of every BatchNorm layer's buffers (all domains), by qualified name.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
        >>> saved = snapshot(model)
        >>> _ = model.train()(torch.randn(4, 3))
        >>> restore(model, saved)
        >>> int(model[0].num_batches_tracked)
        0
    """
    return {
        name: {k: b.detach().clone() for k, b in layer.named_buffers(recurse=False)}
        for name, layer in batchnorm_layers(model)
    }


def restore(model: nn.Module, saved: Snapshot) -> None:
    """Write a :func:`snapshot` back, matching layers and buffers by name.

    Raises:
        ValueError: if the snapshot names a layer or buffer the model lacks.
    """
    layers = dict(batchnorm_layers(model))
    missing = sorted(
        f"{name}.{k}" if name else k
        for name, bufs in saved.items()
        for k in bufs
        if name not in layers or k not in dict(layers[name].named_buffers(recurse=False))
    )
    if missing:
        raise ValueError(
            f"expected the snapshot's BatchNorm buffers in the model, missing: {missing}. "
            "Restore into the model the snapshot was taken from."
        )
    with torch.no_grad():
        for name, bufs in saved.items():
            own = dict(layers[name].named_buffers(recurse=False))
            for k, value in bufs.items():
                own[k].copy_(value)


@contextlib.contextmanager
def accumulate(model: nn.Module) -> Iterator[None]:
    """Pool the running-statistics updates of several forwards and commit them once.

    Inside the block every BatchNorm layer normalizes exactly as it would
    outside, but where its policy would update the running statistics it
    only merges the batch's (count, mean, M2) into a float64 pool. On a
    normal exit each layer applies **one** update (its policy's ``ema`` or
    ``cumulative``) with the pooled statistics, as if the micro-batches had
    been one batch: ``num_batches_tracked`` grows by one. If the block
    raises, nothing is committed. A micro-batch with non-finite statistics is
    left out of the pool (and counted as a skipped update).

    Example:
        >>> bn = torch.nn.BatchNorm1d(3).train()
        >>> x = torch.randn(32, 3)
        >>> with accumulate(bn):
        ...     for micro in x.chunk(4):
        ...         _ = bn(micro)
        >>> ref = torch.nn.BatchNorm1d(3).train()
        >>> _ = ref(x)
        >>> torch.allclose(bn.running_var, ref.running_var), int(bn.num_batches_tracked)
        (True, 1)
    """
    layers = batchnorm_layers(model)
    handle = _controlled(layers)
    try:
        for _, layer in layers:
            if layer._bnctl.pool is not None:
                raise RuntimeError(
                    f"{layer._bnctl.name}: expected no enclosing bnctl.accumulate block, found "
                    "one. Nest the forwards in a single block."
                )
            layer._bnctl.pool = Pool()
        yield
        with torch.no_grad():
            for _, layer in layers:
                state, pool = layer._bnctl, layer._bnctl.pool
                if pool.accumulator is None:
                    continue
                if pool.update == "cumulative" and state.accumulator is None:
                    state.accumulator = Accumulator.empty(layer.num_features, pool.accumulator.mean.device)
                running_mean, running_var, num_batches_tracked, _w, _b = domain_tensors(
                    layer, layer.__dict__.get("_bnctl_domain")
                )
                ok = commit_pooled_(
                    running_mean,
                    running_var,
                    num_batches_tracked,
                    pool.accumulator,
                    pool.update,
                    effective_momentum(layer),
                    state.accumulator,
                )
                if ok is not None:
                    count_skip(state, ok)
    finally:
        for _, layer in layers:
            if hasattr(layer, "_bnctl"):
                layer._bnctl.pool = None
        handle.remove()


def checkpoint_context(model: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """A ``context_fn`` for ``torch.utils.checkpoint`` that keeps recomputation from updating.

    Non-reentrant activation checkpointing runs the forward a second time
    during backward; BatchNorm would update its running statistics twice.
    Pass the result as ``context_fn``: the first forward runs as usual, the
    recomputation runs under :func:`bnctl.no_update` (same normalization,
    nothing written).

    Example:
        >>> from torch.utils.checkpoint import checkpoint
        >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
        >>> x = torch.randn(8, 4, requires_grad=True)
        >>> y = checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_context(block))
        >>> y.sum().backward()
        >>> int(block[1].num_batches_tracked)
        1
    """
    return lambda: (contextlib.nullcontext(), no_update(model))
