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

from .apply import Selector, batchnorm_layers, hold, no_update_layers
from .frozen import is_frozen_batchnorm
from .modules import check_controllable, check_materialized, display_name, is_uninitialized, layer_state
from .state import LayerState, LayerTensors, Pools, Tape
from .stats import Accumulator

__all__ = ["snapshot", "restore", "accumulate", "checkpoint_context", "pooling", "unchanged"]

Snapshot = dict[str, dict[str, Tensor]]


def snapshot(model: nn.Module) -> Snapshot:
    """Copies of every BatchNorm layer's buffers (all domains), by qualified name.

    Raises:
        ValueError: an uninitialized lazy layer (it has no values yet).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
        >>> saved = snapshot(model)
        >>> _ = model.train()(torch.randn(4, 3))
        >>> restore(model, saved)
        >>> int(model[0].num_batches_tracked)
        0
    """
    layers = batchnorm_layers(model)
    for name, layer in layers:
        check_materialized(display_name(name, layer), layer)
    return {
        name: {k: b.detach().clone() for k, b in layer.named_buffers(recurse=False)}
        for name, layer in layers
    }


def restore(model: nn.Module, saved: Snapshot) -> None:
    """Write a :func:`snapshot` back, matching layers and buffers by name.

    Snapshots carry across a ``FrozenBatchNorm2d``'s stand-in swap (:func:`bnctl.apply` puts a
    ``bnctl.BatchNorm2d`` in its place, ``remove()`` puts it back): the frozen layer's ``weight`` and
    ``bias`` buffers are the stand-in's ``weight`` and ``bias``, and the stand-in's
    ``num_batches_tracked`` has no place in the frozen layer (it is left out).

    Raises:
        ValueError: the snapshot names a layer or buffer the model lacks, or holds values of another
            shape (checked before anything is written).
    """
    layers = dict(batchnorm_layers(model))
    missing, plan = [], []
    for name, bufs in saved.items():
        own = _restorable(layers[name]) if name in layers else {}
        for k, value in bufs.items():
            if k in own:
                plan.append((name, k, own[k], value))
            elif not (name in layers and is_frozen_batchnorm(layers[name]) and k.startswith("num_batches_tracked")):
                missing.append(f"{name}.{k}" if name else k)
    if missing:
        raise ValueError(
            f"expected the snapshot's BatchNorm buffers in the model, missing: {sorted(missing)}. "
            "Restore into the model the snapshot was taken from (and with the same domains)."
        )
    for name, k, target, value in plan:
        if target.shape != value.shape:
            raise ValueError(
                f"{display_name(name, layers[name])}: the snapshot's {k} has shape {tuple(value.shape)}, the "
                f"layer's {tuple(target.shape)}. Restore into the model the snapshot was taken from."
            )
    with torch.no_grad():
        for _name, _k, target, value in plan:
            target.copy_(value)


def _restorable(layer: nn.Module) -> dict[str, Tensor]:
    """What :func:`restore` may write in ``layer``: its buffers, and its ``weight`` and ``bias`` (which a
    snapshot holds only when taken of a buffers-only ``FrozenBatchNorm2d``)."""
    own = dict(layer.named_buffers(recurse=False))
    for key in ("weight", "bias"):
        param = layer._parameters.get(key)
        if param is not None:
            own.setdefault(key, param)
    return own


@contextlib.contextmanager
def unchanged(layers: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Run a block that leaves the running statistics of ``layers`` as they were.

    Layers whose forward bnctl can control run under ``no_update``; the others
    (subclasses it cannot control) get their buffers written back on exit.
    """
    controlled, others = [], []
    for name, layer in layers:
        try:
            check_controllable(display_name(name, layer), layer)
            controlled.append((name, layer))
        except (TypeError, ValueError):
            others.append(layer)
    saved = [(layer, {k: b.detach().clone() for k, b in layer.named_buffers(recurse=False)})
             for layer in others if not is_uninitialized(layer)]
    with no_update_layers(controlled):
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, buffers in saved:
                    own = dict(layer.named_buffers(recurse=False))
                    for k, value in buffers.items():
                        own[k].copy_(value)


@contextlib.contextmanager
def accumulate(model: nn.Module, include: Selector = None, exclude: Selector = None) -> Iterator[None]:
    """Pool the running-statistics updates of several forwards and commit them once.

    Inside the block every selected BatchNorm layer normalizes exactly as it
    would outside, but where its policy would update the running statistics
    it only merges the batch's (count, mean, M2) into a float64 pool, one per
    domain (:func:`bnctl.domain`). On a normal exit each layer applies **one**
    update per domain (its policy's ``ema`` or ``cumulative``) with the pooled
    statistics, as if the micro-batches had been one batch:
    ``num_batches_tracked`` grows by one. If the block raises, nothing is
    committed. A micro-batch with non-finite statistics is left out of the
    pool (and counted as a skipped update). Policies applied inside the block
    pool too; if the block's forwards asked for different updates (an EMA
    and a cumulative average), the one asked for last is applied. Blocks do
    not nest: an inner block raises before changing anything; a
    :func:`bnctl.recalibrate` inside writes its result at once and leaves the
    pools as they were.

    Args:
        model: a model, or a single BatchNorm layer.
        include, exclude: which layers (as in :func:`bnctl.apply`; default all).

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
    layers = batchnorm_layers(model, include, exclude)
    for name, layer in layers:
        state = layer_state(layer)
        if state is not None and state.pools is not None:
            raise RuntimeError(
                f"{display_name(name, layer)}: expected no enclosing bnctl.accumulate block, found one. "
                "Nest the forwards in a single block."
            )
    with pooling(layers) as states:
        yield
        with torch.no_grad():
            for (_, layer), state in zip(layers, states):
                if layer_state(layer) is state:  # not reverted inside the block
                    _commit_pools(layer, state)


@contextlib.contextmanager
def pooling(
    layers: list[tuple[str, nn.Module]], kind: type = Accumulator, *, explicit: bool = False
) -> Iterator[list[LayerState]]:
    """Hold ``layers`` with an empty pool each (of ``kind``) for a block; what was there before is
    restored after (an ``accumulate`` block around a ``recalibrate`` keeps its pools).

    Inside, what a layer's forward would write goes to its pool instead
    (see :meth:`bnctl.state.LayerState.commit`). ``explicit`` pools gather
    statistics for an explicit write (``recalibrate``), which an enclosing
    ``no_update`` block does not stop, as it does not stop :func:`restore`.
    """
    with hold(layers) as states:
        previous = [(state.pools, state.no_update) for state in states]
        for state in states:
            state.pools = Pools(kind, local=explicit)
            if explicit:
                state.no_update = 0
        try:
            yield states
        finally:
            for state, (pools, no_update) in zip(states, previous):
                state.pools, state.no_update = pools, no_update


def _commit_pools(layer: nn.Module, state: LayerState) -> None:
    """One update per domain with the statistics pooled there, as if they were one batch."""
    pools, state.pools = state.pools, None
    for domain, pool in pools.by_domain.items():
        stats = pool.as_batch()
        if stats.n < 2:  # nothing pooled, or a single value: no variance to write
            continue
        cumulative, momentum = pools.updates[domain]
        state.write(domain, LayerTensors.of(layer, domain), cumulative, momentum, stats)


def checkpoint_context(
    model: nn.Module, include: Selector = None, exclude: Selector = None
) -> Callable[[], tuple[Any, Any]]:
    """A ``context_fn`` for ``torch.utils.checkpoint`` whose recomputation repeats the forward exactly.

    Non-reentrant activation checkpointing runs the forward a second time
    during backward. Plain BatchNorm would update its running statistics
    twice, and a layer that normalizes with running statistics it has just
    updated (``running_update``, ``renorm`` after warm-up, blends) would
    recompute with the new values, giving wrong gradients. With this
    ``context_fn`` the first forward records, per layer, its mode and the
    running statistics it normalized with; the recomputation replays them
    and writes nothing. The layers are checked here, before any forward.

    Args:
        model: the model (or the checkpointed part of it).
        include, exclude: which BatchNorm layers (as in :func:`bnctl.apply`).

    Raises:
        ValueError, TypeError: a layer bnctl cannot control (as :func:`bnctl.apply`).

    Example:
        >>> from torch.utils.checkpoint import checkpoint
        >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
        >>> x = torch.randn(8, 4, requires_grad=True)
        >>> y = checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_context(block))
        >>> y.sum().backward()
        >>> int(block[1].num_batches_tracked)
        1
    """
    layers = batchnorm_layers(model, include, exclude)
    for name, layer in layers:
        check_controllable(display_name(name, layer), layer)

    def context_fn() -> tuple[Any, Any]:
        tape = Tape()
        return _Recording(layers, tape), _Replaying(layers, tape)

    return context_fn


class _Recording:
    """The first forward of a checkpointed region: each layer records what it does on ``tape``."""

    def __init__(self, layers: list[tuple[str, nn.Module]], tape: Tape) -> None:
        self.layers, self.tape = layers, tape
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            for state in stack.enter_context(hold(self.layers)):
                self._join(state, stack)
            self._stack = stack.pop_all()

    def _join(self, state: LayerState, stack: contextlib.ExitStack) -> None:
        state.join_tape(self.tape)
        stack.callback(state.leave_tape, self.tape)

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


class _Replaying(_Recording):
    """A recomputation of the region (there may be several): the layers replay ``tape`` from its start."""

    def __enter__(self) -> None:
        self.tape.rewind()
        super().__enter__()

    def _join(self, state: LayerState, stack: contextlib.ExitStack) -> None:
        stack.callback(setattr, state, "replay", state.replay)
        state.replay = self.tape
