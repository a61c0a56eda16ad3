"""A PyTorch Lightning callback that applies BatchNorm policies for the length of ``trainer.fit``.

``BatchNormPolicy("frozen_stats")`` holds a policy through training;
``BatchNormPolicy(schedule={0: "torch", 5: "frozen_stats"})`` switches policies
as epochs (or steps) go by ("freeze the statistics after warm-up"). Policies
are applied when fitting starts and removed when it ends or fails, so the
model that comes out of ``fit`` is plain PyTorch again. They survive
Lightning's own ``model.train()``/``model.eval()`` around validation, which
Lightning's ``BaseFinetuning(train_bn=...)`` flags do not: see
:func:`bnctl.apply`.

Works with ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``,
whichever is installed (``lightning`` first), imported when
``BatchNormPolicy`` is first used: without either, that raises an
``ImportError`` saying what to install.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from ..apply import Selector
from ..policy import Policy
from ..schedule import PolicyLike, Schedule


def _callback_class() -> type:
    """Lightning's ``Callback`` base class, from ``lightning`` or ``pytorch_lightning``."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as err:
            raise ImportError(
                "bnctl.integrations.lightning.BatchNormPolicy needs PyTorch Lightning: pip install lightning (or "
                "pytorch-lightning). Without it, call bnctl.Schedule.step(epoch) in your own loop."
            ) from err
    return Callback


__all__ = ["BatchNormPolicy"]  # noqa: F822 (made on first use: see __getattr__)


class _BatchNormPolicy:
    """Apply a BatchNorm policy, or a schedule of them, while ``trainer.fit`` runs.

    * ``on_fit_start``: the policy for the current epoch (or step) is applied
      to the ``LightningModule`` (so ``include``/``exclude`` name modules
      relative to it, e.g. ``"model.layer1"``);
    * ``on_train_epoch_start`` (``unit="epoch"``) or ``on_train_batch_start``
      (``unit="step"``, counted by ``trainer.global_step``): the schedule
      moves on when an entry begins;
    * ``on_fit_end``, ``on_exception`` and ``teardown``: the policy is
      removed, the layers are plain PyTorch again.

    The optimizer is built before ``on_fit_start`` (Lightning calls
    ``configure_optimizers`` first): a policy that freezes BatchNorm's affine
    part clears its gradients, so the optimizer leaves it alone even with
    momentum or weight decay.

    Args:
        policy: a preset name or a :class:`bnctl.Policy`, held for the whole fit (a schedule given here is
            taken as ``schedule``).
        include, exclude: which BatchNorm layers (as in :func:`bnctl.apply`).
        schedule: instead of ``policy``: ``{first epoch (or step): policy}``
            or a :class:`bnctl.Schedule` (which carries its own
            ``include``/``exclude``/``unit``).
        unit: ``"epoch"`` or ``"step"``, for a mapping ``schedule``.

    Raises:
        ValueError: both or neither of ``policy`` and ``schedule``; ``include``/``exclude`` given with a
            :class:`bnctl.Schedule`; a bad schedule (at construction).

    Example::

        trainer = pl.Trainer(max_epochs=10, callbacks=[BatchNormPolicy(schedule={0: "torch", 5: "frozen_stats"})])
        trainer.fit(module, train_loader, val_loader)
    """

    def __init__(
        self,
        policy: str | Policy | Schedule | Mapping[int, PolicyLike] | None = None,
        include: Selector = None,
        exclude: Selector = None,
        schedule: Mapping[int, PolicyLike] | Schedule | None = None,
        unit: str = "epoch",
    ) -> None:
        if isinstance(policy, (Schedule, Mapping)) and schedule is None:  # BatchNormPolicy(bnctl.Schedule(...))
            policy, schedule = None, policy
        if (policy is None) == (schedule is None):
            raise ValueError("BatchNormPolicy: expected a policy or a schedule (one of them), got "
                             f"{'both' if policy is not None else 'neither'}.")
        if isinstance(schedule, Schedule):
            if include is not None or exclude is not None:
                raise ValueError("BatchNormPolicy: a bnctl.Schedule carries its own include/exclude; pass them "
                                 "to the Schedule, or give the schedule as a mapping.")
            self.schedule = schedule
        else:
            # schedule is None here only with a policy that is not a Schedule or mapping (moved above): a PolicyLike
            self.schedule = Schedule(schedule if schedule is not None else {0: cast(PolicyLike, policy)},
                                     include=include, exclude=exclude, unit=unit)

    def _value(self, trainer: Any) -> int:
        return trainer.current_epoch if self.schedule.unit == "epoch" else trainer.global_step

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.step(self._value(trainer), pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule.unit == "epoch":
            self.schedule.step(trainer.current_epoch, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.schedule.unit == "step":
            self.schedule.step(trainer.global_step, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.schedule.remove()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.schedule.remove()

    def __repr__(self) -> str:
        return f"BatchNormPolicy({self.schedule!r})"


def __getattr__(name: str) -> Any:
    """``BatchNormPolicy`` is made on first use, as a subclass of the installed Lightning's ``Callback``, so this
    module imports without Lightning (and says what to install when the callback is asked for)."""
    if name != "BatchNormPolicy":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = type("BatchNormPolicy", (_BatchNormPolicy, _callback_class()),
               {"__module__": __name__, "__qualname__": "BatchNormPolicy", "__doc__": _BatchNormPolicy.__doc__})
    globals()["BatchNormPolicy"] = cls
    return cls
