"""Per-layer state: everything bnctl keeps on a BatchNorm layer it controls.

A layer under bnctl's control carries one :class:`LayerState` (as
``layer._bnctl``; never in the state dict). It holds the layer's policies
(a stack: :func:`bnctl.apply` pushes, ``handle.remove()`` pops), the scopes
it is in (``no_update``, ``accumulate``, a selected domain, an activation-
checkpoint recording), its cumulative accumulators and pools per domain, and
the count of skipped updates. :meth:`LayerState.decide` says what a forward
does (the one decision, from a per-layer :class:`Program` settled when
something changes, and the batch's size); :meth:`LayerState.forward` runs it:
normalization (:mod:`bnctl.functional`), then what the batch says goes where
the scopes say, behind the non-finite guard (:mod:`bnctl.guard`).

Domains: domain ``d`` is a set of tensors named ``running_mean__d``,
``running_var__d``, ``num_batches_tracked__d`` (and optionally ``weight__d``,
``bias__d``) on the layer; ``"default"`` is the canonical tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import context
from .context import batched
from .distributed import across_ranks, active, check_agreement, fingerprint
from .distributed import layer as synchronized_layer
from .functional import Limits, batch_text, normalize, renorm_limits, stages, update_in_kernel
from .guard import Status, copy_if_finite_, write_running_
from .policy import (
    BLEND,
    CUMULATIVE,
    EMA,
    GHOST,
    MIXED,
    NO_UPDATE,
    RENORM,
    RUNNING,
    TORCH,
    Plan,
    Policy,
    Step,
    check_eps,
    for_batch,
    kinds,
    make_plan,
)
from .stats import Accumulator, BatchAverage, BatchStats, batch_stats, ema_weight, global_stats, values_per_channel

__all__ = [
    "AFFINE",
    "DEFAULT",
    "STATS",
    "Applied",
    "Forward",
    "LayerState",
    "Program",
    "LayerTensors",
    "Pools",
    "Tape",
    "UpdateCounts",
    "domain_key",
    "domains",
    "never_updated",
    "warn_in_user_code",
]

DEFAULT = "default"
"""The name of the canonical statistics (``running_mean``, ...)."""

STATS = ("running_mean", "running_var", "num_batches_tracked")
AFFINE = ("weight", "bias")


def domain_key(base: str, domain: str) -> str:
    """The attribute name of tensor ``base`` in ``domain`` (e.g. ``running_mean__target``)."""
    return base if domain == DEFAULT else f"{base}__{domain}"


def domains(layer: nn.Module) -> list[str]:
    """The domains of a layer, ``"default"`` first (read from its buffers)."""
    prefix = "running_mean__"
    return [DEFAULT] + [k[len(prefix):] for k in layer._buffers if k.startswith(prefix)]


def never_updated(running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Any) -> bool:
    """Whether statistics are still PyTorch's initial values (all 0 and 1, no batch tracked)."""
    if running_mean is None or running_var is None:
        return False
    if num_batches_tracked is not None and int(num_batches_tracked) != 0:
        return False
    return bool((running_mean == 0).all()) and bool((running_var == 1).all())


class LayerTensors(NamedTuple):
    """The tensors a forward reads and writes: one domain's statistics and affine parameters."""

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def of(cls, layer: nn.Module, domain: str = DEFAULT) -> LayerTensors:
        buffers, params = layer._buffers, layer._parameters  # direct: this runs every forward
        if domain == DEFAULT:
            return cls(buffers.get("running_mean"), buffers.get("running_var"),
                       buffers.get("num_batches_tracked"), params.get("weight"), params.get("bias"))
        stats = [buffers[domain_key(k, domain)] for k in STATS]
        affine = [params.get(domain_key(k, domain), params.get(k)) for k in AFFINE]
        return cls(*stats, *affine)

    def detached_affine(self) -> LayerTensors:
        """The same tensors, with ``weight`` and ``bias`` cut from autograd."""
        detach = [None if t is None else t.detach() for t in (self.weight, self.bias)]
        return self._replace(weight=detach[0], bias=detach[1])


class Forward(NamedTuple):
    """What one forward of a layer does: the answer of :meth:`LayerState.decide`.

    ``normalize`` and ``update`` are the policy's half for the layer's mode
    (:data:`~bnctl.policy.BATCH`, ...; :data:`~bnctl.policy.NO_UPDATE`, ...)
    after the scopes and the batch rules (:data:`~bnctl.policy.MIXED`: a
    mixed-domain batch, which :meth:`LayerState.forward` splits by domain,
    deciding each part again); ``step`` holds the rest (momentum, fallback,
    renorm schedule, ghost size) and the names for messages. ``keys`` are the
    attribute names of the selected domain's ``running_mean``,
    ``running_var``, ``num_batches_tracked``, ``weight`` and ``bias``.
    ``pool``: updates go to an ``accumulate``/``recalibrate`` pool.
    ``group``: the process group whose ranks' batches make the batch
    (``None``: this rank's alone; the batch rules then wait for the
    collective). ``staged``: the normalization kernel computes the EMA
    (:func:`bnctl.functional.stages`). ``taped``: an activation checkpoint
    records or replays the layer; a ``replayed`` forward carries the
    ``running`` statistics and Batch Renormalization ``limits`` the first one
    used, runs the same ops (autograd must save the same tensors) and writes
    nothing. ``counts_empty``: an empty batch where an EMA update was due,
    which ``num_batches_tracked`` counts (as PyTorch counts every train()
    forward, an EMA with ``momentum=None`` depends on it) and nothing else.
    """

    step: Step
    normalize: int
    update: int
    domain: str
    keys: tuple[str, str, str, str, str]
    alpha: float = 1.0
    detach_affine: bool = False
    pool: bool = False
    group: Any = None
    staged: bool = False
    taped: bool = False
    running: tuple[Tensor, Tensor] | None = None
    limits: Limits | None = None
    replayed: bool = False
    counts_empty: bool = False

    @property
    def folds(self) -> bool:
        """Whether the layer is a fixed per-channel affine map in this forward: it normalizes with running
        statistics and updates nothing, outside any checkpoint recording (what :func:`bnctl.fold` needs)."""
        return self.normalize == RUNNING and self.update == NO_UPDATE and not self.taped


class Program(NamedTuple):
    """What :meth:`LayerState.decide` settles before seeing a batch, for ``eval()`` and ``train()``, and
    the layer attributes it was settled from (a forward checks them, without a call)."""

    eval: Forward
    train: Forward
    momentum: float | None
    track_running_stats: bool
    has_running_stats: bool
    ctx: int
    sync: bool
    synced: bool


@dataclass
class UpdateCounts:
    """Attempted and applied running updates; the difference were skipped (non-finite).

    ``applied`` is an int on the CPU and a tensor on the layer's device
    elsewhere, so counting never waits for the device.
    """

    attempts: int = 0
    applied: int | Tensor = 0

    @property
    def skipped(self) -> int:
        return self.attempts - int(self.applied)

    def counter(self, like: Tensor) -> Tensor | None:
        """The device tensor that counts applied updates, for a guard to increment itself; None on the CPU."""
        return None if like.device.type == "cpu" else self._applied_on(like.device)

    def add(self, ok: Status, counted: bool = False) -> None:
        """One attempt; ``counted``: the guard already added ``ok`` to :meth:`counter`."""
        self.attempts += 1
        if counted:
            return
        if isinstance(ok, bool):
            self.applied += int(ok)
            return
        self._applied_on(ok.device).add_(ok)

    def _applied_on(self, device: torch.device) -> Tensor:
        if not isinstance(self.applied, Tensor) or self.applied.device != device:  # first use, or the layer moved
            with torch.inference_mode(False):
                self.applied = torch.tensor(int(self.applied), dtype=torch.long, device=device)
        return self.applied


@dataclass
class Pools:
    """Batch statistics gathered by ``accumulate()``/``recalibrate()``, per domain, not yet written.

    ``kind`` is :class:`~bnctl.stats.Accumulator` (exact) or
    :class:`~bnctl.stats.BatchAverage`; ``updates`` records, per domain,
    the update the layer's policy asked for (cumulative or not, and the momentum). ``local`` pools
    hold this rank's statistics only, also for synchronizing layers
    (``recalibrate`` merges the ranks itself, once, at the end).
    """

    kind: type[Accumulator] | type[BatchAverage] = Accumulator
    by_domain: dict[str, Accumulator | BatchAverage] = field(default_factory=dict)
    updates: dict[str, tuple[bool, float | None]] = field(default_factory=dict)
    local: bool = False


class Tape:
    """What the first forward of an activation-checkpointed region used, per layer (by id), in order.

    Its recomputation replays those :class:`Forward` records (the running
    statistics as they were then, the same mode) and writes nothing. A
    recomputation may run more than once (``retain_graph=True``): each one
    starts again from the first record (:meth:`rewind`).
    """

    def __init__(self) -> None:
        self.records: dict[int, list[Forward]] = defaultdict(list)
        self.cursor: dict[int, int] = defaultdict(int)

    def rewind(self) -> None:
        self.cursor.clear()

    def next(self, layer: nn.Module, name: str) -> Forward:
        records, position = self.records.get(id(layer), []), self.cursor[id(layer)]
        if position >= len(records):
            raise RuntimeError(
                f"{name}: the activation checkpoint's recomputation ran this layer more often than "
                "the first forward did. Recompute the same function on the same inputs."
            )
        self.cursor[id(layer)] = position + 1
        return records[position]


@dataclass
class Applied:
    """One policy on a layer's stack, with the cumulative averages it has built (per domain)."""

    token: object
    policy: Policy
    accumulators: dict[str, Accumulator] = field(default_factory=dict)
    process_group: Any = None


def _inference_safe(make: Any, *args: Any) -> Any:
    """Create lasting state tensors as normal tensors, also under ``torch.inference_mode()``."""
    with torch.inference_mode(False):
        return make(*args)


@dataclass
class LayerState:
    """What bnctl keeps on one layer (``layer._bnctl``).

    ``origin`` is the class the layer had before bnctl and ``requires_grad``
    its parameters' flags then (:func:`bnctl.revert` restores both).
    ``base`` is the policy under all applied ones (``torch`` for a layer bnctl
    took over, the constructor's for a ``bnctl.BatchNorm*d``); ``builtin``
    layers stay bnctl layers. ``holds`` counts the scopes that keep a taken-over
    layer under control; ``no_update`` those that forbid writes.

    The forward: :meth:`decide` says what a forward does, from the layer's
    :class:`Program` (settled when the policy, a scope or the domain changes:
    setting any field here (:mod:`bnctl.scopes` sets them), :meth:`push` and
    :meth:`pop` drop it) and the batch's size; :meth:`forward` runs it.
    """

    name: str
    origin: type[_BatchNorm]
    requires_grad: dict[str, bool]
    base: Policy = TORCH
    builtin: bool = False
    policies: list[Applied] = field(default_factory=list)
    holds: int = 0
    no_update: int = 0
    domain: str = DEFAULT
    pools: Pools | None = None
    tapes: list[Tape] = field(default_factory=list)
    replay: Tape | None = None
    base_accumulators: dict[str, Accumulator] = field(default_factory=dict)
    routing: Any = None
    counts: UpdateCounts = field(default_factory=UpdateCounts)
    warned_frozen: bool = field(default=False, repr=False)  # see _warn_frozen
    _programs: dict[str | None, Program] = field(default_factory=dict, repr=False)
    _agreement: tuple[Any, Any, Any] = field(default=(None, None, None), repr=False)  # see _global_stats

    def __setattr__(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)
        if key not in ("_programs", "warned_frozen"):  # whatever changed, the program is settled again
            object.__setattr__(self, "_programs", {})

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep policies, accumulators and counts, but not the scopes the
        original is in (those end with the original's ``with`` blocks) nor process groups."""
        state = dict(self.__dict__)
        state.update(holds=0, no_update=0, domain=DEFAULT, pools=None, tapes=[], replay=None, routing=None,
                     _programs={}, _agreement=(None, None, None))
        # A process group belongs to this process (it does not pickle): copies sync over the layer's
        # own group or the world group.
        state["policies"] = [dataclasses.replace(a, process_group=None) for a in self.policies]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- policy ----------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The policy the layer follows now: the last one applied, else the base."""
        return self.policies[-1].policy if self.policies else self.base

    @property
    def accumulators(self) -> dict[str, Accumulator]:
        """The cumulative averages of the current policy, per domain: a policy applied starts its
        own, and removing it brings back those of the policy under it."""
        return self.policies[-1].accumulators if self.policies else self.base_accumulators

    def push(self, token: object, policy: Policy, process_group: Any = None) -> None:
        self.policies.append(Applied(token, policy, process_group=process_group))
        self._programs = {}

    def pop(self, token: object) -> None:
        self.require_top(token)
        self.policies.pop()
        self._programs = {}

    def require_top(self, token: object) -> None:
        """Raise unless ``token``'s policy is the last one applied (handles are removed LIFO)."""
        if not self.policies or self.policies[-1].token is not token:
            raise RuntimeError(
                f"{self.name}: expected the policy this handle applied, found another one. Remove "
                "handles in reverse order of application (or use bnctl.using as a context manager)."
            )

    def sync_group(self, layer: _BatchNorm) -> Any:
        """The process group whose batches this layer's batch statistics span, or ``None`` (local).

        A layer synchronizes when its policy says ``sync=True`` or it is an
        ``nn.SyncBatchNorm``, a process group is initialized, and it is not
        filling ``local`` pools (a ``recalibrate`` pass). The group is the
        last one given to :func:`bnctl.apply` among the policies applied to
        it, else the layer's own ``process_group`` (``nn.SyncBatchNorm``),
        else the default (world) group.
        """
        if not (self.policy.sync or isinstance(layer, nn.SyncBatchNorm)) or not active():
            return None
        if self.pools is not None and self.pools.local:
            return None
        group = next((a.process_group for a in reversed(self.policies) if a.process_group is not None), None)
        if group is None:
            group = getattr(layer, "process_group", None)
        return torch.distributed.group.WORLD if group is None else group

    def plan(self, layer: _BatchNorm) -> Plan:
        """The layer's :class:`~bnctl.policy.Plan`: its policy resolved for its attributes, before scopes."""
        return make_plan(self.policy, momentum=layer.momentum, track_running_stats=layer.track_running_stats,
                         has_running_stats=layer._buffers.get("running_mean") is not None)

    # -- one forward -----------------------------------------------------------------------

    def tensors(self, layer: _BatchNorm) -> LayerTensors:
        """The tensors of the selected domain."""
        return LayerTensors.of(layer, self.domain)

    def program(self, layer: _BatchNorm, ctx: int = context.EAGER, domain: str | None = None) -> Program:
        """What every forward of ``layer`` does until something changes, for ``eval()`` and ``train()``:
        the policy resolved for the layer (:meth:`plan`), then the scopes: ``no_update`` writes
        nothing, pools take the updates, the domain selects the tensors (a mixed-domain batch,
        :attr:`routing`, normalizes :data:`~bnctl.policy.MIXED`: each domain's samples as ``domain``'s
        program says), a checkpoint tape records or replays, the process group makes the batch. Kept on
        the state, except while compiling (the graph keeps what it needs; a cache would only add guards)."""
        plan = self.plan(layer)
        group = self.sync_group(layer)
        pool = self.pools is not None
        routed = domain is None and self.routing is not None
        selected = self.domain if domain is None else domain
        keys = tuple(domain_key(k, selected) for k in STATS)
        keys += tuple(k if selected == DEFAULT or domain_key(k, selected) not in layer._parameters
                      else domain_key(k, selected) for k in AFFINE)
        taped = bool(self.tapes) or self.replay is not None
        if self.policy.learn_affine is False and not self.warned_frozen and not ctx:  # (fold's forwards, too)
            unfrozen = [k for k in keys[3:] if getattr(layer._parameters.get(k), "requires_grad", False)]
            if unfrozen:
                self._warn_frozen(unfrozen[0])

        def half(step: Step) -> Forward:
            normalize, update = kinds(step)
            if self.no_update:
                update = NO_UPDATE
            if routed:
                normalize = MIXED
            return Forward(
                step, normalize, update, selected, keys,  # type: ignore[arg-type]
                alpha=float(step.normalize) if normalize == BLEND else 1.0,
                detach_affine=self.policy.learn_affine is False,
                pool=pool and update != NO_UPDATE,
                group=None if normalize == RUNNING and update == NO_UPDATE else group,  # nothing of the batch used
                staged=update == EMA and not pool and group is None and stages(normalize, step.momentum, ctx),
                taped=taped,
            )

        sync = self.policy.sync or isinstance(layer, nn.SyncBatchNorm)
        program = Program(half(plan.eval), half(plan.train), layer.momentum, layer.track_running_stats,
                          layer._buffers.get("running_mean") is not None, ctx, sync, sync and active())
        if not ctx & context.COMPILING:
            self._programs[domain] = program
        return program

    def decide(self, layer: _BatchNorm, x: Tensor | None, ctx: int = context.EAGER, domain: str | None = None
               ) -> Forward:
        """What this forward of ``layer`` does on ``x``: the one decision every path takes (the layer's
        forward, :func:`bnctl.fold`, the synchronized forward). No side effect but the cached program.
        ``domain``: the part of a mixed-domain batch routed to that domain.

        Without ``x`` it is the decision before the batch rules (eps, the batch's size), which never
        change whether a layer normalizes with running statistics and updates nothing
        (:attr:`Forward.folds`): fold asks that, and a layer it does not fold raises in its own forward.

        Raises:
            ValueError: ``eps <= 0`` where batch statistics normalize, or one value per channel where
                they are needed and the policy has no fallback (both naming the layer).
        """
        programs = self._programs
        program = programs[domain] if domain in programs else None  # (no call: this runs every forward)
        if (program is None or program.ctx != ctx or program.momentum != layer.momentum
                or program.track_running_stats is not layer.track_running_stats
                or program.has_running_stats is (layer._buffers["running_mean"] is None)
                or program.sync and program.synced is not active()):
            program = self.program(layer, ctx, domain)
        forward = program.train if layer.training else program.eval
        if x is None:
            return forward
        if not layer.eps > 0 and forward.normalize != RUNNING:  # (as PyTorch: eval() takes any eps)
            check_eps(layer.eps, self.name)
        if forward.group is not None or forward.normalize == MIXED:  # the rules apply after the collective, or
            return forward  # to each domain's part
        channels = x.shape[1]
        n = x.numel() // channels if channels else 0
        if forward.normalize == GHOST:  # the smallest slice's
            n = values_per_channel(x, forward.step.ghost)
        if n > 1:
            return forward
        return self.for_batch(forward, n, batch_text(x, forward.step.ghost), layer)

    def for_batch(self, forward: Forward, n: int, got: str, layer: _BatchNorm) -> Forward:
        """``forward`` on a batch of ``n`` values per channel (:func:`bnctl.policy.for_batch`)."""
        normalize, update = for_batch(forward.normalize, forward.update, n, fallback=forward.step.fallback,
                                      has_running_stats=layer._buffers.get(forward.keys[0]) is not None,
                                      name=self.name, got=got)
        if (normalize, update) == (forward.normalize, forward.update):
            return forward
        return forward._replace(normalize=normalize, update=update, staged=False, group=None,
                                pool=forward.pool and update != NO_UPDATE,
                                counts_empty=n == 0 and forward.update == EMA and not forward.pool)

    def forward(self, layer: _BatchNorm, x: Tensor, decided: Forward | None = None) -> Tensor:
        """The layer's forward: :meth:`decide` (unless ``decided``: a part of a mixed-domain batch),
        normalize (:func:`bnctl.functional.normalize`), and write what the batch says where the scopes say
        (:mod:`bnctl.guard`)."""
        ctx = context.current()
        forward = self.decide(layer, x, ctx) if decided is None else decided
        if forward.normalize == MIXED:
            return self._routed(layer, x, ctx)
        if forward.taped:
            forward = self._taped(layer, forward)
        buffers, params = layer._buffers, layer._parameters
        mean_key, var_key, count_key, weight_key, bias_key = forward.keys
        running_mean, running_var = buffers[mean_key], buffers[var_key]
        weight: Tensor | None = params[weight_key]
        bias: Tensor | None = params[bias_key]
        if forward.running is not None:
            running_mean, running_var = forward.running
        if forward.detach_affine:  # frozen means frozen, whatever requires_grad says
            if weight is not None and weight.requires_grad:
                weight = weight.detach()
                if not self.warned_frozen and not ctx:
                    self._warn_frozen(weight_key)
            if bias is not None and bias.requires_grad:
                bias = bias.detach()
                if not self.warned_frozen and not ctx:
                    self._warn_frozen(bias_key)
        limits = forward.limits
        if forward.normalize == RENORM and limits is None:
            # a renorm step carries its limits (make_step)
            limits = renorm_limits(*forward.step.renorm, buffers[count_key])  # type: ignore[misc,call-arg]
        args = (x, forward.normalize, running_mean, running_var, weight, bias, layer.eps)
        if forward.group is not None:
            return self._synced(layer, forward, args, limits, ctx)
        if forward.update == NO_UPDATE:
            if forward.counts_empty and not forward.replayed and (counted := buffers[count_key]) is not None:
                counted.add_(1)
            return normalize(*args, alpha=forward.alpha, limits=limits, ghost=forward.step.ghost, ctx=ctx)[0]
        count = buffers[count_key]
        if forward.staged:
            momentum = forward.step.momentum
            # an EMA update has running statistics (resolve_mode updates nothing without them)
            mean: Tensor = running_mean  # type: ignore[assignment]
            counter = None if ctx or mean.is_cpu else self.counts.counter(mean)
            out, ok = update_in_kernel(args, limits, ema_weight(None, count) if momentum is None else momentum,
                                       count, ctx, counter, write=not forward.replayed)
            if forward.replayed:
                return out
            self.count(ok, ctx, counted=counter is not None, running=(running_mean, running_var),
                       n=values_per_channel(x) if ok is False else None)
            return out
        out, stats = normalize(*args, alpha=forward.alpha, limits=limits, ghost=forward.step.ghost, observe=True,
                               ctx=ctx)
        if not forward.replayed:
            self.commit(layer, forward, stats, ctx)  # type: ignore[arg-type]
        return out

    def _routed(self, layer: _BatchNorm, x: Tensor, ctx: int) -> Tensor:
        """A mixed-domain batch (:attr:`routing`, set by ``bnctl.domain(model, labels)``): each domain's samples
        go through the forward of that domain (its statistics, affine, update), and the outputs go back to
        their samples' places. Every part is decided before any runs, so a part that would raise (one value
        per channel, a synchronized or checkpointed layer) raises before anything is written."""
        split = self.routing.split(layer, self.name, x)
        if len(split.domains) == 1:  # (every sample of one domain, for this layer: no copy)
            return self.forward(layer, x, self.decide(layer, x, ctx, split.domains[0]))
        inputs = split.inputs(x)
        forwards = [self.decide(layer, part, ctx, name) for part, name in zip(inputs, split.domains)]
        synced = any(f.group is not None for f in forwards)
        if synced or any(f.taped for f in forwards):
            raise RuntimeError(
                f"{self.name}: a mixed-domain batch (bnctl.domain with one label per sample) cannot be "
                f"{'synchronized over ranks' if synced else 'activation-checkpointed'} "
                "yet. Run one forward per domain (with bnctl.domain(model, name):), or use a policy with "
                "sync=False / no bnctl.checkpoint_context for this model."
            )
        outs = [self.forward(layer, part, f) for part, f in zip(inputs, forwards)]
        return split.merge(outs)

    def _warn_frozen(self, key: str) -> None:
        """Once per layer: ``requires_grad=True`` on a parameter the policy freezes, which gets no gradient.

        Reached only from the branch of :meth:`forward` that detaches such a parameter, so a layer whose flags
        agree with its policy pays nothing for the check.
        """
        self.warned_frozen = True
        warn_in_user_code(
            f"{self.name}: {key} has requires_grad=True, but policy {self.policy.label!r} freezes the affine "
            "part, so it gets no gradient (frozen means frozen, whatever requires_grad says; something set it "
            "after bnctl.apply, e.g. Lightning's BaseFinetuning.make_trainable). To train it, apply a policy "
            "that learns weight and bias (e.g. 'frozen_stats', or dataclasses.replace(policy, "
            "learn_affine=True)), or remove the policy with handle.remove(). Warned once per layer.",
            UserWarning,
        )

    def _synced(
        self, layer: _BatchNorm, forward: Forward,
        args: tuple[Tensor, int, Tensor | None, Tensor | None, Tensor | None, Tensor | None, float],
        limits: Limits | None, ctx: int,
    ) -> Tensor:
        """A forward whose batch statistics span the ranks of ``forward.group``: one collective gives them,
        then the batch rules apply to every rank's batch together (so every rank takes the same branch).

        Eagerly, every rank is checked to run this layer the same way (:meth:`_global_stats`); a collective that
        fails is re-raised naming this layer. Captured code (compile, export, trace) is not checked.
        """
        x = args[0]
        token = None if ctx else synchronized_layer.set(self.name)
        try:
            stats = global_stats(x, forward.group, ctx) if ctx else self._global_stats(layer, forward, x)
            forward = self.for_batch(forward, stats.n, "1 value per channel over all ranks of the process group",
                                     layer)._replace(group=forward.group)
            out, _ = normalize(x, forward.normalize, *args[2:], alpha=forward.alpha, limits=limits,
                               observe=forward.update != NO_UPDATE, group=forward.group, stats=stats, ctx=ctx)
        finally:
            if token is not None:
                synchronized_layer.reset(token)
        if forward.update != NO_UPDATE and not forward.replayed:
            self.commit(layer, forward, stats, ctx)
        return out

    def _global_stats(self, layer: _BatchNorm, forward: Forward, x: Tensor) -> BatchStats:
        """:func:`~bnctl.stats.global_stats` of ``x``, raising on every rank unless every rank of the group runs
        this layer the same way: the layer's :func:`~bnctl.distributed.fingerprint` (name, channels, mode) rides
        in the statistics' collective, at no extra collective. Before the layer's first one (per channel count
        and process group), where ranks running different layers could pair collectives of different sizes and
        abort the process, one small collective of fixed size compares the fingerprints first
        (:func:`~bnctl.distributed.check_agreement`).

        ``_agreement`` keeps (the channels and group checked so, then per mode, eval and train, the program, the
        channels and the fingerprint built for them): rebuilt when the program is settled again, without a
        collective. Set without ``__setattr__``, which would drop the program.
        """
        checked, *tags = self._agreement
        channels, group = x.shape[1], forward.group
        entry = tags[layer.training]
        program = self._programs.get(None)
        if entry is None or entry[0] is not program or entry[1] != channels or entry[2].device != x.device:
            entry = (program, channels, fingerprint(self.name, channels, forward.normalize, forward.update,
                                                          forward.step.momentum, forward.alpha, x.device))
            tags[layer.training] = entry
            object.__setattr__(self, "_agreement", (checked, *tags))
        if checked is None or checked[0] != channels or checked[1] is not group:
            check_agreement(group, self.name, entry[2])
            object.__setattr__(self, "_agreement", ((channels, group), *tags))
        return BatchStats(*across_ranks(*batch_stats(x), group, tag=entry[2], name=self.name))

    def _taped(self, layer: _BatchNorm, forward: Forward) -> Forward:
        """Under an activation checkpoint: a recomputation replays what the first forward did (the running
        statistics as they were then, the same mode, nothing written); a first forward is recorded by every
        checkpoint region it runs in (nested ones too)."""
        if self.replay is not None:
            return self.replay.next(layer, self.name)
        buffers = layer._buffers
        running = None
        mean, var = buffers[forward.keys[0]], buffers[forward.keys[1]]
        if mean is not None and var is not None:  # (both or neither)
            running = (mean.detach().clone(), var.detach().clone())
        limits = None
        if forward.normalize == RENORM:  # a renorm step carries its limits (make_step)
            limits = renorm_limits(*forward.step.renorm, buffers[forward.keys[2]])  # type: ignore[misc,call-arg]
        record = forward._replace(running=running, limits=limits, replayed=True)
        for tape in self.tapes:
            tape.records[id(layer)].append(record)
        return forward._replace(limits=limits)

    def commit(self, layer: _BatchNorm, forward: Forward, stats: BatchStats, ctx: int = context.EAGER) -> None:
        """Write what a forward observed: into the pool of an ``accumulate``/``recalibrate``
        block, or (guarded) into the running statistics."""
        if stats.n == 0:
            return
        if not forward.pool:
            self.write(forward.domain, LayerTensors.of(layer, forward.domain), forward.update == CUMULATIVE,
                       forward.step.momentum, stats, ctx)
            return
        pools, domain = self.pools, forward.domain
        if pools is None:  # (a forward decided inside a block that has ended)
            return
        if ctx & context.EXPORTING:
            raise RuntimeError(
                f"{self.name}: an accumulate/recalibrate block pools statistics outside the module's buffers, "
                "which a traced or exported graph would hold as constants. Trace or export outside the block."
            )
        pool = pools.by_domain.get(domain)
        if pool is None:
            pool = _inference_safe(pools.kind.empty, layer.num_features, stats.mean.device)
            pools.by_domain[domain] = pool
        pools.updates[domain] = (forward.update == CUMULATIVE, forward.step.momentum)
        self.count(copy_if_finite_(pool.tensors, torch.cat(pool.merged(stats)), None, ctx=ctx), ctx, n=stats.n)

    def write(
        self, domain: str, tensors: LayerTensors, cumulative: bool, momentum: float | None, stats: BatchStats,
        ctx: int = context.EAGER,
    ) -> Status:
        """One update of ``domain``'s running statistics with ``stats`` (an EMA, or a cumulative
        average), guarded and counted."""
        # an update has running statistics: resolve_mode updates nothing without them
        running_mean: Tensor = tensors.running_mean  # type: ignore[assignment]
        running_var: Tensor = tensors.running_var  # type: ignore[assignment]
        accumulator = None
        if cumulative:
            if batched(running_mean):
                raise RuntimeError(
                    f"{self.name}: a cumulative average keeps its running sums outside the module's buffers, "
                    "so torch.func.vmap cannot give each model its own. Under vmap use a policy with an EMA "
                    "update (momentum a float), or recalibrate each model outside the transform."
                )
            if ctx & context.EXPORTING:
                raise RuntimeError(
                    f"{self.name}: a cumulative average keeps its running sums outside the module's buffers, "
                    "so a traced or exported graph would hold them as constants and average only its last "
                    "batch. Export the model in eval() or under a policy whose train() update is an EMA, and "
                    "compute population statistics eagerly with bnctl.recalibrate(model, data)."
                )
            accumulator = self.accumulators.get(domain)
            if accumulator is None:
                accumulator = _inference_safe(Accumulator.empty, running_mean.numel(), running_mean.device)
                self.accumulators[domain] = accumulator
        counter = None if ctx or running_mean.is_cpu else self.counts.counter(running_mean)
        ok = write_running_(running_mean, running_var, tensors.num_batches_tracked, stats, momentum,
                            accumulator, counter=counter, ctx=ctx)
        self.count(ok, ctx, counted=counter is not None, running=tensors[:2], n=stats.n)
        return ok

    def count(self, ok: Status, ctx: int = context.EAGER, *, counted: bool = False,
              running: tuple[Tensor | None, ...] = (), n: int | None = None) -> None:
        """Record the outcome of an attempted write; on the CPU, warn about skips.

        A layer warns at its first skip, with the likely cause, and then
        only at its 10th, 100th, 1000th... skip (``skipped_updates`` and
        :func:`bnctl.report` have the count), from the user's line of code.
        Captured code counts nothing: a compiled graph would bake the count
        in. The guard holds there all the same, and ``num_batches_tracked``
        counts only the applied updates.
        """
        if ctx:
            return
        self.counts.add(ok, counted)
        skipped = self.counts.skipped if ok is False else 0
        if skipped and math.log10(skipped).is_integer():
            warn_in_user_code(_skip_message(self.name, skipped, running, n), RuntimeWarning)


def _skip_message(name: str, skipped: int, running: tuple[Tensor | None, ...], n: int | None) -> str:
    present = tuple(t for t in running if t is not None)
    if any(not bool(torch.isfinite(t).all()) for t in present):
        cause = ("its running statistics are already non-finite (a damaged checkpoint, or values written "
                 "without bnctl), so nothing can be averaged into them: rebuild them with "
                 "bnctl.recalibrate(model, data)")
    elif n == 1:
        cause = "the batch has one value per channel, so no unbiased variance"
    else:
        cause = ("the batch statistics are non-finite: the layer's input holds NaN/Inf or overflows; batch "
                 "after batch this usually means the model is diverging (lower the learning rate or the "
                 "momentum, check mixed-precision scaling), once it usually means bad input data")
    if skipped == 1:
        return (f"{name}: skipped a running-statistics update because {cause}. running_mean, running_var "
                "and num_batches_tracked are unchanged. Further skips of this layer warn at the 10th, "
                "100th, ... (layer.skipped_updates and bnctl.report(model) count them all).")
    return f"{name}: {skipped} running-statistics updates skipped so far; the latest because {cause}."


_QUIET = tuple(os.path.dirname(os.path.abspath(f)) for f in (__file__, torch.__file__))
_QUIET += (os.path.abspath(contextlib.__file__),)  # the exit of a with block: warn at the with


def warn_in_user_code(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside bnctl and torch."""
    frame: FrameType | None = sys._getframe(0)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_QUIET):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
