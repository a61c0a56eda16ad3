"""Scopes: blocks that change what BatchNorm layers do, and undo it on exit.

Every scope is one mechanism (:func:`scope`): hold the layers under bnctl's
control, set fields of each layer's state (:class:`bnctl.state.LayerState`),
and restore them in reverse order on exit, also on error. A layer's forward
reads those fields once, when its program is settled
(:meth:`~bnctl.state.LayerState.decide`), so scopes compose by nesting:

* :func:`using`: a policy for the block (:func:`bnctl.apply`, then ``remove()``).
* :func:`no_update`: normalization unchanged, nothing written.
* :func:`accumulate` (and :func:`pooling`, for ``recalibrate``): updates
  pooled and committed once.
* :func:`domain`: one domain's statistics, or each sample its domain's.
* :func:`checkpoint_context`: an activation checkpoint's recomputation
  replays the first forward and writes nothing.
* :func:`unchanged`: the running statistics as they were, also on layers
  bnctl cannot control (their buffers written back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Callable, cast

import torch
from torch import nn

from .apply import PolicyHandle, Selector, apply, apply_to, batchnorm_layers
from .domains import Labels, Routing, layers_with
from .ecosystem import is_frozen_batchnorm
from .modules import check_controllable, control, display_name, is_uninitialized, layer_state, release
from .policy import Policy
from .state import LayerState, LayerTensors, Pools, Tape
from .stats import Accumulator

Layers = Sequence[tuple[str, Any]]
"""``(qualified name, layer)`` pairs, as :func:`bnctl.apply.batchnorm_layers` gives them (BatchNorm layers and
buffers-only FrozenBatchNorm2d ones)."""

__all__ = [
    "accumulate",
    "checkpoint_context",
    "domain",
    "hold",
    "no_update",
    "no_update_layers",
    "pooling",
    "scope",
    "unchanged",
    "using",
    "using_layers",
]


# -- the mechanism -----------------------------------------------------------------------------


@contextlib.contextmanager
def hold(layers: Layers) -> Iterator[list[LayerState]]:
    """Keep ``layers`` under bnctl's control for a block; those it took over go back after.

    Checks every layer before changing any (an uninitialized lazy layer or a
    subclass bnctl cannot control raises, naming it). Yields their states,
    for the block to set its scope on. Buffers-only ``FrozenBatchNorm2d``
    layers are left out: they normalize with their buffers and write nothing,
    whatever the scope.
    """
    layers = [(name, layer) for name, layer in layers if not is_frozen_batchnorm(layer)]
    for name, layer in layers:
        check_controllable(display_name(name, layer), layer)
    states: list[LayerState] = []
    try:
        for name, layer in layers:
            state = control(layer, name)
            state.holds += 1
            states.append(state)
        yield states
    finally:
        for (_, layer), state in zip(layers, states):
            state.holds -= 1
            release(layer)


@contextlib.contextmanager
def scope(layers: Layers, **fields: Callable[[LayerState], Any]) -> Iterator[list[LayerState]]:
    """The one mechanism of every scope: :func:`hold` ``layers``, set each ``field`` of each layer's state to
    what its function returns for that state, and restore the previous values on exit (in reverse order,
    also on error, also where setting failed half-way). Yields the states.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3).train()
        >>> with scope([("bn", bn)], no_update=lambda state: state.no_update + 1):
        ...     _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked)
        0
    """
    with hold(layers) as states, contextlib.ExitStack() as undo:
        for state in states:
            for key, value in fields.items():
                undo.callback(setattr, state, key, getattr(state, key))
                setattr(state, key, value(state))
        yield states


# -- the scopes --------------------------------------------------------------------------------


@contextlib.contextmanager
def using_layers(layers: Layers, policy: Policy) -> Iterator[PolicyHandle]:
    """:func:`using` on a list of ``(name, layer)``."""
    handle = apply_to(list(layers), policy)
    try:
        yield handle
    finally:
        handle.remove()


@contextlib.contextmanager
def no_update_layers(layers: Layers) -> Iterator[None]:
    """:func:`no_update` on a list of ``(name, layer)``."""
    with scope(layers, no_update=lambda state: state.no_update + 1):
        yield


@contextlib.contextmanager
def using(
    model: nn.Module, policy: str | Policy, include: Selector = None, exclude: Selector = None, *,
    process_group: Any = None,
) -> Iterator[PolicyHandle]:
    """Context manager: :func:`bnctl.apply` on entry, ``remove()`` on exit (also on error).

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> with using(bn, "frozen"):
        ...     _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked), type(bn) is torch.nn.BatchNorm1d
        (0, True)
    """
    with apply(model, policy, include, exclude, process_group=process_group) as handle:
        yield handle


@contextlib.contextmanager
def no_update(model: nn.Module, include: Selector = None, exclude: Selector = None) -> Iterator[None]:
    """Context manager: normalization unchanged, no running statistic updated.

    Every selected BatchNorm layer keeps what it normalizes with (under its
    current policy and ``training`` flag), but nothing is written to its
    buffers, also when a policy is applied inside the block. For adversarial
    attacks, extra loss passes, or evaluation passes in train(). Blocks nest;
    each restores on exit, also on error.

    Args:
        model: a model, or a single BatchNorm layer.
        include, exclude: which layers (as in :func:`bnctl.apply`; default all).

    Example:
        >>> bn = torch.nn.BatchNorm1d(3).train()
        >>> with no_update(bn):
        ...     _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked)
        0
    """
    with no_update_layers(batchnorm_layers(model, include, exclude)):
        yield


@contextlib.contextmanager
def unchanged(layers: Layers) -> Iterator[None]:
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
    layers: Layers, kind: type = Accumulator, *, explicit: bool = False
) -> Iterator[list[LayerState]]:
    """Hold ``layers`` with an empty pool each (of ``kind``) for a block; what was there before is
    restored after (an ``accumulate`` block around a ``recalibrate`` keeps its pools).

    Inside, what a layer's forward would write goes to its pool instead
    (see :meth:`bnctl.state.LayerState.commit`). ``explicit`` pools gather
    statistics for an explicit write (``recalibrate``), which an enclosing
    ``no_update`` block does not stop, as it does not stop :func:`restore`.
    """
    fields: dict[str, Callable[[LayerState], Any]] = {"pools": lambda state: Pools(kind, local=explicit)}
    if explicit:
        fields["no_update"] = lambda state: 0
    with scope(layers, **fields) as states:
        yield states


def _commit_pools(layer: nn.Module, state: LayerState) -> None:
    """One update per domain with the statistics pooled there, as if they were one batch."""
    pools, state.pools = state.pools, None
    if pools is None:
        return
    for domain, pool in pools.by_domain.items():
        stats = cast(Accumulator, pool).as_batch()  # (accumulate pools exactly)
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
        return _Scoped(layers, tapes=lambda state: [*state.tapes, tape]), _Scoped(
            layers, tape.rewind, replay=lambda state: tape)

    return context_fn


class _Scoped:
    """:func:`scope` as a context manager that can be entered again after each exit (an activation checkpoint's
    recomputation may run more than once, with ``retain_graph=True``); ``before`` runs at each entry."""

    def __init__(self, layers: Layers, before: Callable[[], Any] | None = None,
                 **fields: Callable[[LayerState], Any]) -> None:
        self.layers, self.before, self.fields = layers, before, fields
        self._scope: Any = None

    def __enter__(self) -> None:
        if self.before is not None:
            self.before()
        self._scope = scope(self.layers, **self.fields)
        self._scope.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        active, self._scope = self._scope, None
        return active.__exit__(*exc)


@contextlib.contextmanager
def domain(model: nn.Module, name: Labels) -> Iterator[None]:
    """Context manager: BatchNorm layers use domain ``name``'s statistics (and affine), or, given one
    label per sample, each sample its own domain's.

    Forwards inside the block read and update only that domain's tensors;
    other domains are untouched. Inside the block each layer's own
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (and
    ``weight``/``bias`` where the domain has its own) are the domain's
    tensors — to read, assign or copy into — while ``state_dict()`` keeps
    naming every tensor by its domain: a checkpoint saved inside the block
    equals one saved outside, and loading inside fills each domain from its
    own keys. :func:`bnctl.report` shows the active domain. Layers without
    that domain keep using their canonical tensors. Restores the previous
    selection on exit, also on error.

    **Mixed-domain batches.** ``name`` may instead be one label per sample of
    the batches the block's forwards run on: a list of domain names, or an
    integer tensor of shape ``(N,)`` indexing :func:`domains` of each layer
    (``0`` is ``"default"``). Each domain's samples are then normalized as
    that domain's alone would be: in ``train()`` with their own batch
    statistics, updating only their domain's running statistics; with
    running statistics (``eval()``, or such a policy) with their domain's;
    with their domain's ``weight``/``bias`` where it has its own. A domain
    absent from the batch is untouched; the output is each sample's, in the
    batch's order. Cost: one normalization per domain present, plus a gather
    of each domain's samples and of the outputs where the labels are not
    sorted by domain (sorted labels take views and one concatenation). The
    grouping is computed once per block and device (one host synchronization
    for tensor labels). The layers' own ``running_mean`` (...) attributes stay
    those of the enclosing single-domain selection. Not combined with
    synchronized statistics or ``bnctl.checkpoint_context`` (clear error).

    Raises:
        ValueError: if no layer of the model has domain ``name`` (a label
            names an unknown domain, or an index exceeds a layer's domains);
            labels that are neither names nor an integer tensor of shape
            ``(N,)``. A forward whose batch has another number of samples than
            labels, or lies on another device than a label tensor, raises
            naming the layer, before anything is written.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> _ = bnctl.add_domains(bn, "target")
        >>> with domain(bn, "target"):
        ...     _ = bn.train()(torch.randn(8, 3) + 5)
        ...     int(bn.num_batches_tracked)  # the target domain's
        1
        >>> int(bn.num_batches_tracked), int(bn.num_batches_tracked__target)
        (0, 1)
        >>> with domain(bn, ["default"] * 4 + ["target"] * 4):  # one label per sample
        ...     _ = bn(torch.randn(8, 3))
        >>> int(bn.num_batches_tracked), int(bn.num_batches_tracked__target)
        (1, 2)
    """
    fields: dict[str, Callable[[LayerState], Any]]
    if isinstance(name, str):
        layers, fields = layers_with(model, name), {"domain": lambda state: name, "routing": lambda state: None}
    else:
        routing = Routing.of(model, name)
        layers, fields = routing.layers, {"routing": lambda state: routing}
    with scope(layers, **fields):
        yield
