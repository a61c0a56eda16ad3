"""BatchNorm policies: what a layer normalizes with and what it updates.

A :class:`Policy` separates the two things PyTorch ties to ``module.training``:

* **normalize** -- which statistics normalize the input: ``"batch"``,
  ``"running"``, ``"renorm"`` (Batch Renormalization) or a blend ``alpha`` in
  ``[0, 1]`` (``alpha * batch + (1 - alpha) * running``);
* **update** -- what happens to the running buffers: ``"none"``, ``"ema"`` or
  ``"cumulative"``.

A policy gives both for ``train()`` and for ``eval()``, plus whether the affine
parameters learn. This module answers every policy question once:
:func:`resolve_mode` (the truth table) and :func:`needs_running_stats` decide
what a policy means on a given layer, and :func:`make_plan` turns a policy into
a layer's :class:`Plan` when it is applied, so a forward reads
``plan[layer.training]``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, Union

__all__ = [
    "BATCH",
    "BLEND",
    "CUMULATIVE",
    "EMA",
    "GHOST",
    "MIXED",
    "NO_UPDATE",
    "RENORM",
    "RUNNING",
    "Mode",
    "Plan",
    "Policy",
    "PRESETS",
    "Step",
    "get_policy",
    "make_plan",
    "check_eps",
    "check_normalize",
    "check_update",
    "for_batch",
    "kinds",
    "make_step",
    "needs_running_stats",
    "resolve_mode",
    "momentum_from_decay",
    "momentum_from_half_life",
]

LAYER: Final = "layer"
"""``Policy.momentum``'s default: use the layer's own ``momentum`` attribute."""

Normalize = Union[Literal["batch", "running", "renorm"], float]
Update = Literal["none", "ema", "cumulative"]

_NORMALIZE_NAMES = ("batch", "running", "renorm")
_UPDATE_NAMES = ("none", "ema", "cumulative")


class Mode(NamedTuple):
    """What one forward of one layer does.

    ``normalize`` is ``"batch"``, ``"running"``, ``"renorm"`` or a float blend
    weight ``alpha`` (weight of the batch statistics); ``update`` is
    ``"none"``, ``"ema"`` or ``"cumulative"``.
    """

    normalize: Normalize
    update: Update


def check_normalize(value: object, field: str) -> None:
    """Raise, naming ``field``, unless ``value`` is a normalize kind or a blend weight in [0, 1]."""
    if isinstance(value, bool) or not (
        value in _NORMALIZE_NAMES or isinstance(value, (int, float))
    ):
        raise ValueError(
            f"{field}: expected one of {_NORMALIZE_NAMES} or a blend weight "
            f"in [0, 1], got {value!r}."
        )
    if isinstance(value, (int, float)) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"{field}: a blend weight must lie in [0, 1] "
            f"(1 = batch statistics, 0 = running statistics), got {value!r}."
        )


def check_update(value: object, field: str) -> None:
    """Raise, naming ``field``, unless ``value`` is an update kind."""
    if value not in _UPDATE_NAMES:
        raise ValueError(
            f"{field}: expected one of {_UPDATE_NAMES}, got {value!r}."
        )


def _check_ghost(policy: Policy) -> None:
    """Raise unless ``policy.ghost`` is a slice size the rest of the policy combines with."""
    ghost = policy.ghost
    if isinstance(ghost, bool) or not isinstance(ghost, int) or ghost < 1:
        raise ValueError(f"Policy.ghost: expected a virtual batch size (an int >= 1) or None, got {ghost!r}.")
    if policy.train_normalize != "batch":
        raise ValueError(
            f"Policy.ghost: ghost batches normalize each slice of {ghost} samples with its own batch statistics, "
            f"so train_normalize must be 'batch', got {policy.train_normalize!r}. Use a preset that normalizes "
            "with batch statistics in train() (e.g. 'torch', 'batch_no_update'), or ghost=None."
        )
    if policy.sync:
        raise ValueError(
            "Policy.ghost: ghost batches are slices of each rank's own batch, which sync=True would replace by "
            "the union of all ranks' batches. Use sync=False with ghost, or ghost=None with sync=True."
        )


@dataclass(frozen=True)
class Policy:
    """How a BatchNorm layer behaves under ``train()`` and under ``eval()``.

    Behaviour contract: the layer's ``training`` flag only selects which half
    of the policy applies (``train_*`` or ``eval_*``); ``model.train()`` and
    ``model.eval()`` never change the policy itself. Built-in presets are
    listed in :data:`PRESETS`; derive variants with :func:`dataclasses.replace`.

    Args:
        train_normalize: statistics that normalize under ``train()``:
            ``"batch"``, ``"running"``, ``"renorm"`` or a blend weight
            ``alpha`` in ``[0, 1]`` (``mu = alpha * mean_B + (1 - alpha) *
            running_mean``, the same for the variance).
        train_update: running-statistics update under ``train()``:
            ``"none"``, ``"ema"`` or ``"cumulative"``.
        eval_normalize: as ``train_normalize``, under ``eval()``.
        eval_update: as ``train_update``, under ``eval()``.
        learn_affine: ``True``/``False`` sets ``requires_grad`` of ``weight``
            and ``bias`` (``False`` also clears stale ``.grad``); ``None``
            leaves them as they are.
        momentum: EMA momentum in PyTorch's convention (weight of the new
            batch), with PyTorch's meanings: a float in ``[0, 1]``, or
            ``None`` for a cumulative average over ``num_batches_tracked``.
            The default, ``"layer"``, uses the layer's own ``momentum``
            attribute.
        fallback: when a batch has one value per channel and batch
            statistics are needed, normalize that batch with the running
            statistics and update nothing, instead of raising.
        rmax: Batch Renormalization limit on ``r`` after warm-up (``>= 1``).
        dmax: Batch Renormalization limit on ``|d|`` after warm-up (``>= 0``).
        renorm_warmup: ``(start, end)`` in updates (``num_batches_tracked``):
            ``r`` is clipped to ``[1, 1]`` and ``d`` to ``[0, 0]`` until
            ``start``, then the limits grow linearly to ``rmax``/``dmax`` at
            ``end`` (Ioffe 2017 used 5k and 40k steps). Until ``start`` the
            ``renorm`` preset is exactly the ``torch`` preset, so a fine-tune
            shorter than the default warm-up never renormalizes; shorten it in
            one line: ``dataclasses.replace(bnctl.PRESETS["renorm"],
            renorm_warmup=(0, 1000))``. :func:`bnctl.report` flags a layer
            still before ``start``.
        sync: compute every batch statistic the layer uses or writes over
            the union of all ranks' batches (``torch.distributed``; the
            layer's process group, see :func:`bnctl.apply`): normalization,
            its gradient, EMA and cumulative updates, the non-finite guard.
            Without an initialized process group it changes nothing.
            ``nn.SyncBatchNorm`` layers synchronize under any policy.
        ghost: a virtual ("ghost") batch size ``k``: in ``train()`` each
            consecutive slice of ``k`` samples is normalized with its own batch
            statistics (Hoffer et al. 2017; a smaller last slice with its
            own), while the running statistics receive one update per forward
            from the exact statistics of the whole batch, merged from the
            slices'. ``eval()`` is unchanged. Needs ``train_normalize="batch"``
            and combines with every update kind, ``learn_affine``, ``fallback``
            (a slice of one value per channel follows the one-value rule) and
            domains, not with ``sync``. ``None``: the whole batch.
        name: preset name, for messages and reports. A policy derived from
            a preset with :func:`dataclasses.replace` keeps the name but
            displays the fields it changed (see :attr:`label`).

    Raises:
        ValueError: if a field has a value outside the ones listed above.

    Example:
        >>> import dataclasses, bnctl
        >>> p = bnctl.get_policy("frozen_stats")
        >>> p.mode(training=True)
        Mode(normalize='running', update='none')
        >>> dataclasses.replace(p, train_update="ema").mode(training=True)
        Mode(normalize='running', update='ema')
    """

    train_normalize: Normalize = "batch"
    train_update: Update = "ema"
    eval_normalize: Normalize = "running"
    eval_update: Update = "none"
    learn_affine: bool | None = None
    momentum: float | None | Literal["layer"] = "layer"
    fallback: bool = False
    rmax: float = 3.0
    dmax: float = 5.0
    renorm_warmup: tuple[int, int] = (5000, 40000)
    sync: bool = False
    ghost: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        check_normalize(self.train_normalize, "Policy.train_normalize")
        check_normalize(self.eval_normalize, "Policy.eval_normalize")
        check_update(self.train_update, "Policy.train_update")
        check_update(self.eval_update, "Policy.eval_update")
        if self.learn_affine not in (None, True, False):
            raise ValueError(
                f"Policy.learn_affine: expected True, False or None, got {self.learn_affine!r}."
            )
        if self.momentum not in (None, LAYER) and (
            isinstance(self.momentum, bool)
            or not isinstance(self.momentum, (int, float))
            or not 0.0 <= self.momentum <= 1.0
        ):
            raise ValueError(
                f"Policy.momentum: expected a float in [0, 1] in PyTorch's convention "
                f"(weight of the new batch), None (cumulative average) or {LAYER!r} (the layer's "
                f"own), got {self.momentum!r}. For a Keras/Flax decay such as 0.99 use "
                "bnctl.momentum_from_decay(0.99)."
            )
        if not (isinstance(self.rmax, (int, float)) and self.rmax >= 1.0):
            raise ValueError(f"Policy.rmax: expected a number >= 1, got {self.rmax!r}.")
        if not (isinstance(self.dmax, (int, float)) and self.dmax >= 0.0):
            raise ValueError(f"Policy.dmax: expected a number >= 0, got {self.dmax!r}.")
        if not isinstance(self.sync, bool):
            raise ValueError(f"Policy.sync: expected True or False, got {self.sync!r}.")
        if self.ghost is not None:
            _check_ghost(self)
        warm = self.renorm_warmup
        if not (
            isinstance(warm, tuple)
            and len(warm) == 2
            and all(isinstance(s, int) and s >= 0 for s in warm)
            and warm[0] <= warm[1]
        ):
            raise ValueError(
                "Policy.renorm_warmup: expected a tuple (start, end) of integers with "
                f"0 <= start <= end, got {warm!r}."
            )

    def mode(self, training: bool) -> Mode:
        """The (normalize, update) half of the policy for ``train()`` or ``eval()``."""
        if training:
            return Mode(self.train_normalize, self.train_update)
        return Mode(self.eval_normalize, self.eval_update)

    @property
    def updates(self) -> bool:
        """Whether the policy ever writes the running statistics."""
        return self.train_update != "none" or self.eval_update != "none"

    @property
    def reads_running_stats(self) -> bool:
        """Whether the policy ever normalizes with the running statistics."""
        return self.train_normalize != "batch" or self.eval_normalize != "batch"

    @property
    def label(self) -> str:
        """How the policy displays: its name, plus the fields that differ from the preset of that
        name (so a modified preset never displays as the preset); ``"custom"`` without a name.

        Example:
            >>> dataclasses.replace(PRESETS["running_update"], momentum=0.001).label
            'running_update(momentum=0.001)'
        """
        if self.name is None:
            return "custom"
        preset = PRESETS.get(self.name)
        if preset is None or preset is self:
            return self.name
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) != getattr(preset, f.name)
        ]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def __str__(self) -> str:
        return (
            f"{self.label} (train: {self.train_normalize}/{self.train_update}, "
            f"eval: {self.eval_normalize}/{self.eval_update}, learn_affine={self.learn_affine})"
        )


PRESETS: dict[str, Policy] = {
    p.name: p  # type: ignore[misc]
    for p in (
        Policy(name="torch"),
        Policy("running", "none", "running", "none", learn_affine=False, name="frozen"),
        Policy("running", "none", "running", "none", learn_affine=True, name="frozen_stats"),
        Policy("running", "ema", "running", "none", name="running_update"),
        Policy("batch", "none", "running", "none", name="batch_no_update"),
        Policy("batch", "none", "batch", "none", learn_affine=True, name="test_time"),
        Policy(
            "batch", "cumulative", "batch", "cumulative", learn_affine=False, name="recalibrate"
        ),
        Policy("renorm", "ema", "running", "none", name="renorm"),
    )
}
"""The built-in presets, by name. See the README's truth table.

``renorm`` keeps the paper's warm-up (plain batch statistics until 5,000
updates, full limits at 40,000): for a short fine-tune, start it at once with
``dataclasses.replace(PRESETS["renorm"], renorm_warmup=(0, 1000))``.
"""

TORCH = PRESETS["torch"]


def get_policy(policy: str | Policy) -> Policy:
    """Turn a preset name or a :class:`Policy` into a :class:`Policy`.

    Raises:
        ValueError: for an unknown preset name (the message lists the valid ones).
        TypeError: for anything that is neither a string nor a Policy.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        try:
            return PRESETS[policy]
        except KeyError:
            raise ValueError(
                f"Unknown BatchNorm policy {policy!r}. Expected one of {sorted(PRESETS)}, "
                "or a bnctl.Policy."
            ) from None
    raise TypeError(
        f"expected a preset name or a bnctl.Policy, got {type(policy).__name__}."
    )


def resolve_mode(
    policy: Policy, training: bool, track_running_stats: bool, has_running_stats: bool
) -> Mode:
    """Decide what one forward of a layer does. The one place that decides it.

    ``has_running_stats`` says whether the ``running_mean``/``running_var``
    buffers exist (they are ``None`` when the layer was built with
    ``track_running_stats=False``). The whole truth table, for any policy
    ``P``, where ``P.mode(training)`` is the half of the policy that applies:

    =====================  ===================  =================================
    has_running_stats      track_running_stats  result
    =====================  ===================  =================================
    False                  any                  ``("batch", "none")``
    True                   True                 ``P.mode(training)``
    True                   False                ``P.mode(training)`` with
                                                ``update`` forced to ``"none"``
    =====================  ===================  =================================

    For the ``torch`` preset this gives exactly PyTorch's behaviour:

    ========  =====  =====  ======================
    buffers   track  mode   result
    ========  =====  =====  ======================
    yes       yes    train  batch / ema
    yes       yes    eval   running / none
    yes       no     train  batch / none
    yes       no     eval   running / none
    no        any    any    batch / none
    ========  =====  =====  ======================

    :func:`needs_running_stats` says for which policies the first row would
    mean something other than the policy; :func:`bnctl.apply` and the layer
    constructors refuse those ahead of time, so it never silently replaces a
    policy.

    Example:
        >>> resolve_mode(PRESETS["running_update"], True, True, True)
        Mode(normalize='running', update='ema')
        >>> resolve_mode(PRESETS["torch"], False, False, False)
        Mode(normalize='batch', update='none')
    """
    if not has_running_stats:
        return Mode("batch", "none")
    mode = policy.mode(training)
    if not track_running_stats:
        return Mode(mode.normalize, "none")
    return mode


def needs_running_stats(policy: Policy) -> bool:
    """Whether ``policy`` means something else than PyTorch does on a layer without running statistics.

    Such a layer always normalizes with the batch and updates nothing
    (the first row of :func:`resolve_mode`'s table). A policy fits it when
    that is what the policy says anyway: batch statistics in ``train()``,
    batch (or, as in PyTorch, running, which is then unavailable) statistics
    in ``eval()``, and no update other than the ``torch`` preset's own.

    Example:
        >>> [name for name, p in PRESETS.items() if needs_running_stats(p)]
        ['frozen', 'frozen_stats', 'running_update', 'recalibrate', 'renorm']
    """
    if policy.train_normalize != "batch" or policy.eval_normalize not in ("batch", "running"):
        return True
    return policy.updates and (policy.mode(True), policy.mode(False)) != _TORCH_MODES


_TORCH_MODES = (TORCH.mode(True), TORCH.mode(False))


class Step(NamedTuple):
    """What one forward of one layer does: one half of a :class:`Plan`.

    ``normalize`` is ``"batch"``, ``"running"``, ``"renorm"`` or a blend
    weight strictly between 0 and 1 (the end points are the plain modes);
    ``update`` is ``"none"``, ``"ema"`` or ``"cumulative"``; ``momentum`` is
    the EMA weight of the new batch (``None``: PyTorch's cumulative average);
    ``renorm`` is ``(rmax, dmax, (start, end))`` for ``normalize="renorm"``;
    ``ghost`` the slice size of ghost batches (``normalize="batch"`` only).
    """

    normalize: Normalize
    update: Update
    momentum: float | None = 0.1
    fallback: bool = False
    renorm: tuple[float, float, tuple[int, int]] | None = None
    ghost: int | None = None


class Plan(NamedTuple):
    """A policy resolved for one layer: ``plan[layer.training]`` is the :class:`Step` of a forward."""

    eval: Step
    train: Step


def make_plan(
    policy: Policy, *, momentum: float | None, track_running_stats: bool, has_running_stats: bool
) -> Plan:
    """Resolve ``policy`` for a layer with these attributes (``momentum`` is the layer's own; the
    policy's replaces it unless it is ``"layer"``).

    Example:
        >>> plan = make_plan(PRESETS["renorm"], momentum=0.1, track_running_stats=True,
        ...                  has_running_stats=True)
        >>> plan[True].normalize, plan[True].renorm, plan[False].update
        ('renorm', (3.0, 5.0, (5000, 40000)), 'none')
    """
    effective = momentum if policy.momentum == LAYER else policy.momentum
    renorm = (policy.rmax, policy.dmax, policy.renorm_warmup)

    def step(training: bool) -> Step:
        mode = resolve_mode(policy, training, track_running_stats, has_running_stats)
        return make_step(mode, effective, policy.fallback, renorm, policy.ghost if training else None)

    return Plan(eval=step(False), train=step(True))


_BLEND_ENDS: dict[float, Normalize] = {1.0: "batch", 0.0: "running"}
"""The blend weights that are plain modes."""


def make_step(
    mode: Mode,
    momentum: float | None,
    fallback: bool = False,
    renorm: tuple[float, float, tuple[int, int]] = (3.0, 5.0, (0, 0)),
    ghost: int | None = None,
) -> Step:
    """The :class:`Step` of ``mode``; a blend's end points become the plain modes; ``ghost`` applies
    where batch statistics normalize.

    Example:
        >>> make_step(Mode(1.0, "ema"), 0.1)
        Step(normalize='batch', update='ema', momentum=0.1, fallback=False, renorm=None, ghost=None)
    """
    normalize = mode.normalize
    if not isinstance(normalize, str):
        normalize = _BLEND_ENDS.get(float(normalize), float(normalize))
    return Step(normalize, mode.update, momentum, fallback, renorm if normalize == "renorm" else None,
                ghost if normalize == "batch" else None)


def momentum_from_decay(decay: float) -> float:
    """PyTorch momentum from a Keras/Flax/TensorFlow decay: ``m = 1 - decay``.

    Keras ``BatchNormalization(momentum=0.99)`` and Flax ``momentum=0.99`` keep
    99% of the old statistics; PyTorch's ``momentum`` is the weight of the new
    batch.

    Example:
        >>> round(momentum_from_decay(0.99), 6)
        0.01
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"expected a decay in [0, 1], got {decay!r}.")
    return 1.0 - decay


def momentum_from_half_life(batches: float) -> float:
    """PyTorch momentum whose EMA halves an old batch's weight every ``batches`` updates.

    .. math:: (1 - m)^{h} = 1/2 \\quad\\Rightarrow\\quad m = 1 - 2^{-1/h}

    Example:
        >>> round(momentum_from_half_life(1), 6)
        0.5
        >>> round(momentum_from_half_life(100), 6)
        0.006908
    """
    if not (isinstance(batches, (int, float)) and batches > 0 and math.isfinite(batches)):
        raise ValueError(f"expected a positive, finite half-life in batches, got {batches!r}.")
    return 1.0 - 2.0 ** (-1.0 / batches)



# -- the forward path's words: mode strings become these small ints here, and only here ---------

BATCH, RUNNING, RENORM, BLEND, GHOST, MIXED = 0, 1, 2, 3, 4, 5
"""How a forward normalizes: this batch's statistics, the running ones, Batch Renormalization, a blend, each
slice of ``Step.ghost`` samples with its own statistics, each sample with its domain's (a mixed-domain batch,
which the layer state splits by domain: :meth:`bnctl.state.LayerState.decide`)."""
NO_UPDATE, EMA, CUMULATIVE = 0, 1, 2
"""What a forward's batch does to the running statistics: nothing, an EMA, a cumulative average."""

_NORMALIZE_KINDS: dict[Normalize, int] = {"batch": BATCH, "running": RUNNING, "renorm": RENORM}
_UPDATE_KINDS = {"none": NO_UPDATE, "ema": EMA, "cumulative": CUMULATIVE}


def kinds(step: Step) -> tuple[int, int]:
    """``step``'s (normalize, update) as the forward path compares them (a float is a blend).

    Example:
        >>> kinds(make_step(Mode("running", "ema"), 0.1)) == (RUNNING, EMA)
        True
    """
    normalize = GHOST if step.ghost else _NORMALIZE_KINDS.get(step.normalize, BLEND)
    return normalize, _UPDATE_KINDS[step.update]


def for_batch(normalize: int, update: int, n: int, *, fallback: bool, has_running_stats: bool, name: str,
              got: object) -> tuple[int, int]:
    """(normalize, update) of a forward whose batch has ``n`` values per channel: the batch rules.

    * An empty batch (``n = 0``) updates nothing (and normalizes with the
      running statistics only where it would anyway).
    * One value per channel has no batch variance: a mode that needs batch
      statistics raises (naming ``name``; ``got`` describes the batch), or
      with ``fallback`` normalizes with the running statistics and updates
      nothing. With running normalization an update is still attempted: its
      unbiased variance is undefined, so the guard skips it and counts it.

    Every path takes these rules from here on the batch size alone: a layer
    on its input (:meth:`bnctl.state.LayerState.decide`), a synchronized
    layer on every rank's batch together, :func:`bnctl.functional.batch_norm`.

    Raises:
        ValueError: one value per channel where batch statistics are needed.
    """
    if n > 1:
        return normalize, update
    if n == 0:
        return (RUNNING if normalize == RUNNING else BATCH), NO_UPDATE
    if normalize == RUNNING:
        return normalize, update
    if fallback and has_running_stats:
        return RUNNING, NO_UPDATE
    raise ValueError(
        f"{name}: expected more than 1 value per channel to compute batch statistics, got {got}. Fixes: use "
        "a policy that normalizes with running statistics in this mode (e.g. 'frozen' or 'frozen_stats'), use "
        "a larger batch, pass drop_last=True to the DataLoader, or use a policy with fallback=True to "
        "normalize such batches with the running statistics."
    )


def check_eps(eps: float, name: str) -> None:
    """Raise, naming ``name``, unless ``eps > 0``: for a forward that normalizes with batch statistics.

    PyTorch refuses ``eps <= 0`` in training and accepts it in ``eval()``, so
    a forward that normalizes with running statistics does too (a layer
    whose forward bnctl folds into its conv included).
    """
    if not eps > 0:
        raise ValueError(
            f"{name}: expected eps > 0 to normalize with batch statistics, got eps={eps!r}. Set the "
            "layer's eps to a small positive number (PyTorch's default is 1e-5)."
        )
