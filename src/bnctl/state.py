"""Per-layer state: everything bnctl keeps on a BatchNorm layer it controls.

A layer under bnctl's control carries one :class:`LayerState` (as
``layer._bnctl``; never in the state dict). It holds the layer's policies
(a stack: :func:`bnctl.apply` pushes, ``handle.remove()`` pops), the scopes
it is in (``no_update``, ``accumulate``, a selected domain, an activation-
checkpoint recording), its cumulative accumulators and pools per domain, and
the count of skipped updates. Two methods are the whole protocol of a forward:
:meth:`LayerState.begin` says what the forward does and with which tensors,
:meth:`LayerState.commit` writes what it observed where the scopes say, behind
the non-finite guard.

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
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .distributed import active
from .functional import (
    Accumulator,
    BatchAverage,
    BatchStats,
    Limits,
    Observed,
    Status,
    batched,
    check_eps,
    copy_if_finite_,
    ema_weight,
    renorm_limits,
    step_for_batch,
    traced,
    transformed,
    write_running_,
)
from .policy import TORCH, Plan, Policy, Step, make_plan

__all__ = [
    "AFFINE",
    "DEFAULT",
    "STATS",
    "Applied",
    "Forward",
    "LayerState",
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
    """What one forward of a layer does: its step, its tensors, and what derives from them.

    ``ema_weight`` is set when the native kernel computes the EMA itself (a
    direct ``"ema"`` update of a ``"batch"`` step); otherwise the forward
    observes the batch's statistics (or nothing, when ``step.update`` is
    ``"none"``). ``group`` is the process group whose ranks' batches make the
    batch (``None``: this rank's alone).
    """

    step: Step
    tensors: LayerTensors
    domain: str
    limits: Limits
    ema_weight: float | None
    group: Any = None


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

    ``kind`` is :class:`~bnctl.functional.Accumulator` (exact) or
    :class:`~bnctl.functional.BatchAverage`; ``updates`` records, per domain,
    the update (and momentum) the layer's policy asked for. ``local`` pools
    hold this rank's statistics only, also for synchronizing layers
    (``recalibrate`` merges the ranks itself, once, at the end).
    """

    kind: type = Accumulator
    by_domain: dict[str, Accumulator | BatchAverage] = field(default_factory=dict)
    updates: dict[str, tuple[str, float | None]] = field(default_factory=dict)
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
    """

    name: str
    origin: type
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
    counts: UpdateCounts = field(default_factory=UpdateCounts)
    _plan: tuple[tuple[Any, ...], Plan] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep policies, accumulators and counts, but not the scopes the
        original is in (those end with the original's ``with`` blocks) nor process groups."""
        state = dict(self.__dict__)
        state.update(holds=0, no_update=0, domain=DEFAULT, pools=None, tapes=[], replay=None, _plan=None)
        # A process group belongs to this process (it does not pickle): copies sync over the layer's
        # own group or the world group.
        state["policies"] = [dataclasses.replace(a, process_group=None) for a in self.policies]
        return state

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

    def sync_group(self, layer: nn.Module) -> Any:
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

    def pop(self, token: object) -> None:
        self.require_top(token)
        self.policies.pop()

    def require_top(self, token: object) -> None:
        """Raise unless ``token``'s policy is the last one applied (handles are removed LIFO)."""
        if not self.policies or self.policies[-1].token is not token:
            raise RuntimeError(
                f"{self.name}: expected the policy this handle applied, found another one. Remove "
                "handles in reverse order of application (or use bnctl.using as a context manager)."
            )

    def plan(self, layer: nn.Module) -> Plan:
        """The layer's :class:`~bnctl.policy.Plan`, resolved again only when an input to it changed."""
        policy = self.policy
        key = (policy, layer.momentum, layer.track_running_stats, layer.running_mean is not None)
        if torch.compiler.is_compiling():  # resolved at trace time; a cache would only add guards
            return make_plan(policy, momentum=key[1], track_running_stats=key[2], has_running_stats=key[3])
        cached = self._plan
        if cached is None or cached[0][0] is not policy or cached[0][1:] != key[1:]:
            plan = make_plan(policy, momentum=key[1], track_running_stats=key[2], has_running_stats=key[3])
            self._plan = cached = (key, plan)
        return cached[1]

    # -- one forward -----------------------------------------------------------------------

    def tensors(self, layer: nn.Module) -> LayerTensors:
        """The tensors of the selected domain."""
        return LayerTensors.of(layer, self.domain)

    def begin(self, layer: nn.Module, x: Tensor) -> Forward:
        """What this forward of ``layer`` does on ``x``, and with which tensors.

        Under an activation checkpoint's recomputation it is what the first
        forward did (recorded then); under ``no_update`` nothing is updated.
        Every checkpoint region the forward runs in records it (nested ones too).
        """
        forward = self.replay.next(layer, self.name) if self.replay is not None else self._decide(layer, x)
        for tape in self.tapes:
            self._record(tape, layer, forward)
        return forward

    def _decide(self, layer: nn.Module, x: Tensor) -> Forward:
        tensors = self.tensors(layer)
        plan = self.plan(layer)
        step = plan.train if layer.training else plan.eval  # (a bool index breaks older dynamo graphs)
        group = self.sync_group(layer)
        if group is None:
            step = step_for_batch(step, x, layer.eps, tensors.running_mean is not None, self.name)
        else:  # the batch is every rank's: its size is known after the collective, in the forward
            check_eps(layer.eps, self.name)
        if self.no_update and step.update != "none":
            step = step._replace(update="none")
        limits: Limits = (3.0, 5.0)
        if step.renorm is not None and step.normalize == "renorm":
            limits = renorm_limits(*step.renorm, tensors.num_batches_tracked)
        if step.normalize == "running" and step.update == "none":
            group = None  # nothing of the batch is used: no collective
        weight = None
        if step.update == "ema" and step.normalize == "batch" and self.pools is None and group is None:
            weight = ema_weight(step.momentum, tensors.num_batches_tracked)
            if isinstance(weight, Tensor) or transformed():
                weight = None  # the kernel takes a float weight, and under vmap its writes into views are lost
        if self.policy.learn_affine is False:  # frozen means frozen, whatever requires_grad says
            tensors = tensors.detached_affine()
        return Forward(step, tensors, self.domain, limits, weight, group)

    @staticmethod
    def _record(tape: Tape, layer: nn.Module, forward: Forward) -> None:
        t = forward.tensors
        if t.running_mean is not None:
            t = t._replace(running_mean=t.running_mean.detach().clone(), running_var=t.running_var.detach().clone())
        tape.records[id(layer)].append(forward._replace(tensors=t))

    def commit(self, layer: nn.Module, forward: Forward, observed: Observed) -> None:
        """Write what a forward observed: into the pool of an ``accumulate``/``recalibrate``
        block, or (guarded) into the running statistics. Never during a replay."""
        if self.replay is not None or (isinstance(observed, BatchStats) and observed.n == 0):
            return  # (an empty batch over all ranks of a synchronized layer updates nothing)
        if self.pools is None:
            step = forward.step
            self.write(forward.domain, forward.tensors, step.update, step.momentum, observed)
            return
        if not isinstance(observed, BatchStats):
            raise TypeError(f"{self.name}: expected batch statistics to pool, got {type(observed).__name__}.")
        pools, domain = self.pools, forward.domain
        pool = pools.by_domain.get(domain)
        if pool is None:
            pool = _inference_safe(pools.kind.empty, layer.num_features, observed.mean.device)
            pools.by_domain[domain] = pool
        pools.updates[domain] = (forward.step.update, forward.step.momentum)
        self.count(copy_if_finite_(pool.tensors, torch.cat(pool.merged(observed)), None), observed=observed)

    def write(
        self, domain: str, tensors: LayerTensors, update: str, momentum: float | None, observed: Observed
    ) -> Status:
        """One ``update`` of ``domain``'s running statistics with ``observed``, guarded and counted."""
        accumulator = None
        if update == "cumulative" and batched(tensors.running_mean):
            raise RuntimeError(
                f"{self.name}: a cumulative average keeps its running sums outside the module's buffers, "
                "so torch.func.vmap cannot give each model its own. Under vmap use a policy with an EMA "
                "update (momentum a float), or recalibrate each model outside the transform."
            )
        if update == "cumulative":
            accumulator = self.accumulators.get(domain)
            if accumulator is None:
                accumulator = _inference_safe(Accumulator.empty, tensors.running_mean.numel(),
                                              tensors.running_mean.device)
                self.accumulators[domain] = accumulator
        counter = None if traced() else self.counts.counter(tensors.running_mean)
        ok = write_running_(update, tensors.running_mean, tensors.running_var, tensors.num_batches_tracked,
                            observed, momentum, accumulator, counter=counter)
        self.count(ok, tensors, observed, counted=counter is not None)
        return ok

    def count(
        self, ok: Status, tensors: LayerTensors | None = None, observed: Observed | None = None, counted: bool = False
    ) -> None:
        """Record the outcome of an attempted write; on the CPU, warn about skips.

        A layer warns at its first skip, with the likely cause, and then
        only at its 10th, 100th, 1000th... skip (``skipped_updates`` and
        :func:`bnctl.report` have the count), from the user's line of code.
        Traced code (:func:`~bnctl.functional.traced`) counts nothing: a
        compiled graph would bake the count in. The guard holds there all
        the same, and ``num_batches_tracked`` counts only the applied updates.
        """
        if traced():
            return
        self.counts.add(ok, counted)
        skipped = self.counts.skipped if ok is False else 0
        if skipped and math.log10(skipped).is_integer():
            warn_in_user_code(_skip_message(self.name, skipped, tensors, observed), RuntimeWarning)


def _skip_message(name: str, skipped: int, tensors: LayerTensors | None, observed: Observed | None) -> str:
    running = [t for t in (tensors or LayerTensors(None, None, None, None, None))[:2] if t is not None]
    if any(not bool(torch.isfinite(t).all()) for t in running):
        cause = ("its running statistics are already non-finite (a damaged checkpoint, or values written "
                 "without bnctl), so nothing can be averaged into them: rebuild them with "
                 "bnctl.recalibrate(model, data)")
    elif isinstance(observed, BatchStats) and observed.n == 1:
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


_QUIET = tuple(os.path.dirname(os.path.abspath(m.__file__)) for m in (sys.modules[__name__], torch))
_QUIET += (os.path.abspath(contextlib.__file__),)  # the exit of a with block: warn at the with


def warn_in_user_code(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside bnctl and torch."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_QUIET):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
