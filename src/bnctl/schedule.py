"""Policy schedules: which BatchNorm policy holds from which epoch (or step) on.

``Schedule({0: "torch", 5: "frozen_stats"})`` is "train BatchNorm normally,
then freeze its statistics after a warm-up of five epochs". In a plain loop,
call ``schedule.step(epoch)`` at the start of each epoch; in PyTorch Lightning,
give it to :class:`bnctl.integrations.lightning.BatchNormPolicy`. Like every
policy, a scheduled one survives ``model.train()``/``model.eval()``: a trainer
switching modes around its validation loop changes nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Union

from torch import nn

from .apply import PolicyHandle, Selector, apply
from .policy import Policy, get_policy

__all__ = ["Schedule"]

UNITS = ("epoch", "step")

PolicyLike = Union[str, Policy, None]


class Schedule:
    """A map from epochs (or steps) to BatchNorm policies, applied as training goes.

    ``step(value)`` applies the policy whose key is the largest key ``<= value``
    to the selected layers, after removing the one applied before; a value
    before the first key leaves the layers plain (as does a ``None`` policy).
    Calling it again within the same entry changes nothing, so it may be
    called every epoch or every step. ``remove()`` (or leaving a ``with``
    block) restores the layers exactly.

    Args:
        policies: ``{first epoch or step: policy}``, each policy a preset name,
            a :class:`bnctl.Policy` or ``None`` (plain layers); or one policy,
            meaning ``{0: policy}``.
        model: the model to apply them to (or pass it to the first ``step``).
        include, exclude: which BatchNorm layers (as in :func:`bnctl.apply`).
        unit: ``"epoch"`` or ``"step"``: what the keys count (the Lightning
            callback reads it; in a plain loop, pass the matching counter).

    Raises:
        ValueError: a negative or non-integer key, an unknown preset or unit
            (at construction, before anything changes).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> schedule = Schedule({0: "torch", 2: "frozen_stats"}, model=model)
        >>> for epoch in range(4):
        ...     _ = schedule.step(epoch)
        ...     _ = model.train()(torch.randn(8, 4))  # one "epoch"
        >>> int(model[1].num_batches_tracked), model[1].policy.name
        (2, 'frozen_stats')
        >>> schedule.remove(); type(model[1]).__name__
        'BatchNorm1d'
    """

    def __init__(
        self,
        policies: Mapping[int, PolicyLike] | str | Policy,
        *,
        model: nn.Module | None = None,
        include: Selector = None,
        exclude: Selector = None,
        unit: str = "epoch",
    ) -> None:
        if isinstance(policies, (str, Policy)):
            policies = {0: policies}
        if not isinstance(policies, Mapping) or not policies:
            raise ValueError(f"Schedule: expected a non-empty mapping {{epoch or step: policy}}, got {policies!r}.")
        for key in policies:
            if not isinstance(key, int) or isinstance(key, bool) or key < 0:
                raise ValueError(f"Schedule: expected keys to be epochs or steps (ints >= 0), got {key!r}.")
        if unit not in UNITS:
            raise ValueError(f"Schedule: expected unit to be one of {list(UNITS)}, got {unit!r}.")
        self.keys = sorted(policies)
        self.policies: list[Policy | None] = [None if (p := policies[k]) is None else get_policy(p)
                                              for k in self.keys]
        self.unit = unit
        self.include, self.exclude = include, exclude
        self.model = model
        self._handle: PolicyHandle | None = None
        self._index: int | None = None  # the entry in effect (None: none yet)

    def policy_at(self, value: int) -> Policy | None:
        """The policy the schedule gives at epoch (or step) ``value``; ``None`` for plain layers."""
        index = bisect.bisect_right(self.keys, value) - 1
        return None if index < 0 else self.policies[index]

    @property
    def current(self) -> Policy | None:
        """The policy applied now (``None``: plain layers, or nothing applied yet)."""
        return None if self._handle is None or self._index is None else self.policies[self._index]

    def step(self, value: int, model: nn.Module | None = None) -> Policy | None:
        """Apply the policy for epoch (or step) ``value``; returns it (``None``: plain layers).

        Args:
            value: the current epoch (or step) count, from 0.
            model: the model, if not given at construction (the schedule then stays with it until
                :meth:`remove`).

        Raises:
            ValueError: a model other than the one the schedule holds policies on.
        """
        if model is not None and model is not self.model:
            if self._handle is not None:
                raise ValueError(
                    "Schedule.step: expected the model the schedule applied its policy to, got another one. "
                    "Call schedule.remove() before moving it to another model."
                )
            self.model, self._index = model, None
        if self.model is None:
            raise ValueError("Schedule.step: expected a model: pass Schedule(..., model=model) or step(value, model).")
        index = bisect.bisect_right(self.keys, value) - 1
        wanted = None if index < 0 else self.policies[index]
        if self._index is not None and (index == self._index or wanted == self.current):
            self._index = index
            return wanted
        self._release()
        if wanted is not None:
            self._handle = apply(self.model, wanted, self.include, self.exclude)
        self._index = index
        return wanted

    def _release(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.remove()

    def remove(self) -> None:
        """Remove the policy in effect: the layers are as they were before the first ``step`` (idempotent)."""
        self._release()
        self._index = None

    def __enter__(self) -> Schedule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        entries = ", ".join(f"{k}: {p.label if p is not None else None!r}" for k, p in zip(self.keys, self.policies))
        return f"Schedule({{{entries}}}, unit={self.unit!r})"
