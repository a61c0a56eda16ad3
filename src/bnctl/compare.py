"""Choose a BatchNorm setting by measurement, on your own model and data.

:func:`compare` answers "freeze BatchNorm, update it, recalibrate it, or keep
batch statistics?" the way a learning-rate finder answers "which learning
rate?": a short, controlled experiment. Each setting fine-tunes a deep copy of
the model, from the same weights and in the same data order, for the same
number of steps; then every copy is evaluated the same way. The result prints
as a table with the best setting marked and a one-line suggestion that says how
sure it is, and gives ``records()``, ``to_json(path)`` and ``plot(path)``.

The engine is one loop, :func:`fine_tune`, used by :func:`compare` and by
``bnctl demo``. :func:`count_saved` measures what autograd keeps for backward;
:func:`batchnorm_tensors` and :func:`batchnorm_drift` say what changed in the
BatchNorm layers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .apply import Selector, apply, batchnorm_layers
from .fold import fold as fold_model
from .modules import display_name
from .policy import PRESETS, Policy, get_policy
from .recalibrate import progress_bar, recalibrate
from .report import report
from .scopes import domain as domain_scope
from .scopes import no_update

__all__ = [
    "DEFAULT_SETTINGS",
    "CompareResult",
    "CompareRow",
    "FineTuneLog",
    "LayerDrift",
    "Recalibrate",
    "SavedMemory",
    "Setting",
    "accuracy",
    "as_setting",
    "batchnorm_drift",
    "batchnorm_tensors",
    "compare",
    "count_saved",
    "default_optimizer",
    "fine_tune",
]

logger = logging.getLogger(__name__)

Prepare = Callable[[nn.Module, Iterable[Any]], None]
Forward = Callable[[nn.Module, Any], "tuple[Any, Any]"]
Loss = Callable[[Any, Any], Tensor]
Metric = Callable[[Any, Any], Union[float, Tensor]]
OptimizerFactory = Callable[[list], torch.optim.Optimizer]

DEFAULT_SETTINGS: tuple[str, ...] = ("torch", "frozen", "frozen_stats", "running_update", "recalibrate+frozen_stats")
"""The settings of the forum question: plain BatchNorm (``torch``); ``bn.eval()`` done right (``frozen``:
running statistics, nothing updated, affine frozen, surviving ``model.train()``); ``frozen_stats`` (the same
with learning affine); ``running_update`` (running statistics that keep updating); and AdaBN before
fine-tuning (``recalibrate+frozen_stats``: the copy's statistics recomputed over the fine-tuning batches, then
``frozen_stats``)."""


def default_optimizer(params: list) -> torch.optim.Optimizer:
    """The optimizer :func:`compare` uses unless told otherwise: Adam with ``lr=1e-4``, small fine-tuning steps
    that every setting tolerates. (SGD with ``lr=0.01`` and momentum 0.9 diverged under every setting that
    normalizes with running statistics when fine-tuning a ResNet-18, ``examples/compare_resnet18_digits.py``;
    pass your own optimizer to compare at the learning rate you will use.)"""
    return torch.optim.Adam(params, lr=1e-4)


def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Top-1 accuracy of a batch of logits ``(N, C, ...)`` against class indices ``(N, ...)``."""
    return (output.argmax(1) == target).double().mean()


# -- settings --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recalibrate:
    """The ``prepare`` step of ``"recalibrate+..."`` settings: :func:`bnctl.recalibrate` over the batches it
    is given (AdaBN / precise BN on the fine-tuning data, before the policy is applied).

    Args:
        forward: ``forward(model, batch)`` for batches that are not tensors or ``(input, ...)`` tuples
            (:func:`compare` passes its own ``forward``).
    """

    forward: Callable[[nn.Module, Any], Any] | None = None

    def __call__(self, model: nn.Module, data: Iterable[Any]) -> None:
        recalibrate(model, data, forward=self.forward, progress=False)

    def __str__(self) -> str:
        return "recalibrate"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to fine-tune a model, for :func:`compare`.

    A copy of the model, in ``eval()``, is given to ``prepare`` (if any), then
    gets ``policy`` (if any) on the BatchNorm layers chosen by ``include`` and
    ``exclude``, then is folded (``fold=True``, see :func:`bnctl.fold`), then
    is fine-tuned and evaluated.

    Args:
        name: how the row is called in the table (unique within a comparison).
        policy: a preset name or a :class:`bnctl.Policy`; ``None`` leaves the
            layers as they are (plain ``torch.nn`` behaviour, or whatever
            ``prepare`` or an earlier ``bnctl.apply`` set).
        prepare: ``prepare(model, data)``, called on the copy before the policy
            is applied: ``data`` yields the batches the fine-tuning will see,
            in the same order (the first ``steps`` batches of the training
            data). For example recalibration (:class:`Recalibrate`), or adding
            a domain and recalibrating into it. It changes the copy in place;
            its return value is ignored.
        fold: fold each BatchNorm into the convolution before it while the
            setting runs (it changes time and memory, not results).
        steps: fine-tuning steps for this setting (``None``: :func:`compare`'s
            ``steps``; ``0``: evaluate the prepared copy without training).
        domain: the :func:`bnctl.domain` to run in: a name (fine-tuning and
            every evaluation inside it), or a mapping from validation-set name
            to domain (fine-tuning in the layers' own statistics, each listed
            validation set in its domain).
        include, exclude: which BatchNorm layers get ``policy`` (as in
            :func:`bnctl.apply`).

    Example:
        >>> Setting.parse("recalibrate+frozen_stats+fold")
        Setting(name='recalibrate+frozen_stats+fold', policy='frozen_stats', prepare=Recalibrate(forward=None), \
fold=True, steps=None, domain=None, include=None, exclude=None)
    """

    name: str
    policy: str | Policy | None = None
    prepare: Prepare | None = None
    fold: bool = False
    steps: int | None = None
    domain: str | Mapping[str, str] | None = None
    include: Selector = None
    exclude: Selector = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Setting: expected a non-empty name, got {self.name!r}.")
        if self.policy is not None:
            get_policy(self.policy)  # unknown names raise here, listing the presets
        if self.prepare is not None and not callable(self.prepare):
            raise TypeError(f"Setting {self.name!r}: expected prepare to be a callable (model, data) -> None, "
                            f"got {type(self.prepare).__name__}.")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"Setting {self.name!r}: expected steps to be None or an int >= 0, got {self.steps!r}.")
        if self.domain is not None and not isinstance(self.domain, (str, Mapping)):
            raise TypeError(f"Setting {self.name!r}: expected domain to be a name or a mapping from validation "
                            f"set to domain name, got {type(self.domain).__name__}.")

    @classmethod
    def parse(cls, text: str) -> Setting:
        """A setting from its short form ``[recalibrate+]PRESET[+fold]``: ``"frozen"``,
        ``"recalibrate+frozen_stats"``, ``"frozen+fold"`` (the command line's ``--settings``).

        Raises:
            ValueError: an unknown preset (the message lists them) or form.
        """
        parts = [p.strip() for p in text.split("+")]
        fold = parts[-1] == "fold" and len(parts) > 1
        if fold:
            parts = parts[:-1]
        prepare = None
        if len(parts) == 2 and parts[0] == "recalibrate":
            prepare, parts = Recalibrate(), parts[1:]
        if len(parts) != 1 or parts[0] not in PRESETS:
            close = difflib.get_close_matches(parts[-1], sorted(PRESETS), n=1)
            raise ValueError(
                f"expected a setting of the form [recalibrate+]PRESET[+fold] with PRESET one of {sorted(PRESETS)}, "
                f"got {text!r}." + (f" Did you mean {close[0]!r}?" if close else "")
            )
        return cls(text, parts[0], prepare, fold)

    def policy_label(self) -> str | None:
        """The policy as it displays (``None`` without one)."""
        return None if self.policy is None else get_policy(self.policy).label


def as_setting(obj: str | Policy | Setting | Prepare, index: int = 0) -> Setting:
    """Turn what :func:`compare` accepts as a setting into a :class:`Setting`: a short form string (see
    :meth:`Setting.parse`), a :class:`bnctl.Policy` (named by its label), a :class:`Setting`, or a
    ``prepare(model, data)`` callable (named by its ``__name__``; ``index`` names lambdas).

    Raises:
        ValueError: an unknown preset.
        TypeError: anything else.
    """
    if isinstance(obj, Setting):
        return obj
    if isinstance(obj, str):
        return Setting.parse(obj)
    if isinstance(obj, Policy):
        return Setting(obj.label, obj)
    if callable(obj):
        name = getattr(obj, "__name__", type(obj).__name__)
        return Setting(f"setting {index + 1}" if name == "<lambda>" else name, prepare=obj)
    raise TypeError(
        f"expected a setting to be a preset name, a bnctl.Policy, a bnctl.Setting or a callable "
        f"(model, data) -> None, got {type(obj).__name__}."
    )


# -- measurements ----------------------------------------------------------------------------------


@dataclasses.dataclass
class SavedMemory:
    """Bytes of the distinct storages autograd saved for backward inside a :func:`count_saved` block.

    Attributes:
        total: every saved storage, counted once.
        activations: the same without the model's own parameters and buffers (which exist anyway): what the
            graph keeps alive for backward.
    """

    total: int = 0
    activations: int = 0


@contextlib.contextmanager
def count_saved(model: nn.Module | None = None) -> Iterator[SavedMemory]:
    """Count what autograd saves for backward inside the block, deterministically.

    Every tensor autograd saves passes through ``torch.autograd.graph.saved_tensors_hooks``; its untyped
    storage is counted once, however many tensors view it. The numbers are filled in when the block ends.

    Args:
        model: its parameters and buffers are left out of ``activations``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> with count_saved(model) as saved:
        ...     out = model(torch.randn(16, 4))
        >>> saved.activations > 0, saved.total > saved.activations
        (True, True)
    """
    own = set() if model is None else {t.untyped_storage().data_ptr()
                                       for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (sparse, nested) are not counted
            return t
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    saved = SavedMemory()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield saved
    finally:
        saved.total = sum(storages.values())
        saved.activations = sum(n for ptr, n in storages.items() if ptr not in own)


_BN_TENSORS = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")


def batchnorm_tensors(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Copies of each BatchNorm layer's ``running_mean``, ``running_var``, ``num_batches_tracked``,
    ``weight`` and ``bias`` (those it has), by qualified name: the *before* and *after* of
    :func:`batchnorm_drift`."""
    return {
        display_name(name, layer): {k: t.detach().clone() for k in _BN_TENSORS
                                    if isinstance(t := getattr(layer, k, None), Tensor)}
        for name, layer in batchnorm_layers(model)
    }


@dataclasses.dataclass
class LayerDrift:
    """How far one BatchNorm layer moved between two :func:`batchnorm_tensors`.

    Attributes:
        name: the layer's qualified name.
        stats: how far the running statistics moved: the larger of the running mean's shift measured in
            running standard deviations, ``‖Δrunning_mean‖ / ‖sqrt(running_var)‖``, and the relative change of
            the running variance, ``‖Δrunning_var‖ / ‖running_var‖`` (norms over channels, ``running_var``
            before; 0 = unchanged). ``None`` without running statistics.
        affine: the relative change of weight and bias taken together, ``‖Δ(weight, bias)‖ / ‖(weight,
            bias)‖`` (before; 0 = unchanged). ``None`` without them.
        updates: how many times ``num_batches_tracked`` moved (``None`` without it).
    """

    name: str
    stats: float | None
    affine: float | None
    updates: int | None


def _relative(delta: Tensor, scale: Tensor) -> float:
    """``‖delta‖ / ‖scale‖`` (in float64; ``‖delta‖`` itself when ``scale`` is zero)."""
    diff, norm = float(delta.double().norm()), float(scale.double().norm())
    return diff / norm if norm > 0 else diff


def _stats_drift(b: Mapping[str, Tensor], a: Mapping[str, Tensor]) -> float | None:
    if not all(k in b and k in a for k in ("running_mean", "running_var")):
        return None
    var = b["running_var"].double()
    return max(_relative(a["running_mean"].double() - b["running_mean"].double(), var.clamp_min(0).sqrt()),
               _relative(a["running_var"].double() - var, var))


def _affine_drift(b: Mapping[str, Tensor], a: Mapping[str, Tensor]) -> float | None:
    keys = [k for k in ("weight", "bias") if k in b and k in a]
    if not keys:
        return None
    before = torch.cat([b[k].double().flatten() for k in keys])
    after = torch.cat([a[k].double().flatten() for k in keys])
    return _relative(after - before, before)


def batchnorm_drift(before: Mapping[str, Mapping[str, Tensor]],
                    after: Mapping[str, Mapping[str, Tensor]]) -> list[LayerDrift]:
    """Per layer present in both, how far its statistics and affine parameters moved (see :class:`LayerDrift`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> before = batchnorm_tensors(model)
        >>> _ = model.train()(torch.randn(8, 4))
        >>> d = batchnorm_drift(before, batchnorm_tensors(model))[0]
        >>> d.name, d.stats > 0, d.affine, d.updates
        ('1', True, 0.0, 1)
    """
    rows = []
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            continue
        updates = None
        if "num_batches_tracked" in b and "num_batches_tracked" in a:
            updates = int(a["num_batches_tracked"]) - int(b["num_batches_tracked"])
        rows.append(LayerDrift(name, _stats_drift(b, a), _affine_drift(b, a), updates))
    return rows


# -- the engine ------------------------------------------------------------------------------------


@dataclasses.dataclass
class FineTuneLog:
    """What :func:`fine_tune` did.

    Attributes:
        losses: the training loss of each step (as a float).
        step_seconds: wall time of each step (forward, loss, backward, optimizer step; not data loading).
        saved: what autograd saved in the first step (with ``measure_memory=True``).
        stopped: ``None`` when every step ran, else why not: ``"data ended after k of n steps"`` or
            ``"diverged at step k (loss nan)"``.
        steps_done: the steps that ran.
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    saved: SavedMemory | None = None
    stopped: str | None = None
    steps_done: int = 0

    @property
    def diverged(self) -> bool:
        return self.stopped is not None and self.stopped.startswith("diverged")

    @property
    def seconds_per_step(self) -> float | None:
        """The median step time, leaving out the first step (warm-up, and the memory count) when there are more."""
        times = self.step_seconds[1:] or self.step_seconds
        return statistics.median(times) if times else None


def _split(model: nn.Module, batch: Any, forward: Forward | None) -> tuple[Any, Any]:
    """``(output, target)`` of a batch: ``forward(model, batch)``, or for ``(input, target, ...)`` batches
    ``(model(input), target)``."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return model(batch[0]), batch[1]
    raise TypeError(
        f"expected each batch to be an (input, target) pair, got {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}. Pass "
        "forward=lambda model, batch: (output, target) to say how to use batches of another form."
    )


def _batches(data: Iterable[Any], cycle: bool) -> Iterator[Any]:
    """The batches of ``data``, started again each time it ends when ``cycle`` (an empty ``data`` ends)."""
    if not cycle:
        yield from data
        return
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            return


class _FirstBatches:
    """A re-iterable view of the first ``n`` batches of ``data`` (each iteration starts ``data`` afresh)."""

    def __init__(self, data: Iterable[Any], n: int, cycle: bool) -> None:
        self.data, self.n, self.cycle = data, n, cycle

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(_batches(self.data, self.cycle), self.n)


def fine_tune(
    model: nn.Module,
    data: Iterable[Any],
    steps: int,
    *,
    loss: Loss = F.cross_entropy,
    optimizer: OptimizerFactory | type | None = None,
    forward: Forward | None = None,
    cycle: bool = False,
    measure_memory: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    log: FineTuneLog | None = None,
) -> FineTuneLog:
    """Fine-tune ``model`` in place for ``steps`` steps: the one training loop of :func:`compare` and
    ``bnctl demo``.

    Builds the optimizer on the parameters that require grad (as the BatchNorm
    policy left them), then per step: zero the gradients, forward, loss,
    backward, optimizer step, and read the loss. It stops early when the data
    ends (unless ``cycle``) or the loss is not finite (the model has diverged:
    that step's update is already made). Like the inside of a training loop's
    epoch it leaves modes alone: call ``model.train()`` first (:func:`compare`
    does), so that a setting made by hand, such as ``bn.eval()`` after
    ``model.train()``, is measured as it is.

    Args:
        model: the model, changed in place.
        data: an iterable of ``(input, target, ...)`` batches (or anything ``forward`` takes).
        steps: how many optimizer steps.
        loss: ``loss(output, target) -> Tensor`` (default: cross-entropy).
        optimizer: an optimizer class or a factory ``params -> Optimizer`` (default
            :func:`default_optimizer`: Adam, lr 1e-4).
        forward: ``forward(model, batch) -> (output, target)`` for batches of other forms.
        cycle: start ``data`` again when it ends.
        measure_memory: count what autograd saves in the first step (:func:`count_saved`).
        on_step: called after each step with ``(step, loss)`` (a progress bar).
        log: a :class:`FineTuneLog` to fill in (what ran is in it even when the loop is interrupted).

    Returns:
        The :class:`FineTuneLog`.

    Raises:
        ValueError: ``steps > 0`` and no parameter requires grad.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> log = fine_tune(model.train(), data, 5, cycle=True)
        >>> len(log.losses), log.stopped
        (5, None)
        >>> fine_tune(model, data, 5).stopped
        'data ended after 2 of 5 steps'
    """
    log = FineTuneLog() if log is None else log
    if steps <= 0:
        return log
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "expected parameters to train, got none: every parameter has requires_grad=False. Unfreeze the "
            "parameters to fine-tune (a 'frozen' policy freezes only BatchNorm's weight and bias)."
        )
    opt = (optimizer or default_optimizer)(params)
    batches = _batches(data, cycle)
    for step in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            log.stopped = f"data ended after {step} of {steps} steps"
            break
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with count_saved(model) if measure_memory and step == 0 else contextlib.nullcontext() as saved:
            output, target = _split(model, batch, forward)
            value = loss(output, target)
        value.backward()
        opt.step()
        current = float(value.detach())  # waits for the step, on any device
        log.step_seconds.append(time.perf_counter() - start)
        log.losses.append(current)
        log.steps_done = step + 1
        if saved is not None:
            log.saved = saved
        if on_step is not None:
            on_step(step, current)
        if not math.isfinite(current):
            log.stopped = f"diverged at step {step + 1} (loss {current})"
            break
    return log


def _evaluate(model: nn.Module, data: Iterable[Any], loss: Loss, metric: Metric | None,
              forward: Forward | None) -> tuple[float | None, float | None]:
    """``(metric, loss)`` averaged over the samples of ``data`` (each batch weighted by its size), in eval(),
    without gradients and with no running statistic updated; ``(None, None)`` for empty data."""
    model.eval()
    total = metric_sum = loss_sum = 0.0
    with torch.no_grad(), no_update(model):
        for batch in data:
            output, target = _split(model, batch, forward)
            n = len(target) if hasattr(target, "__len__") else 1
            total += n
            loss_sum += float(loss(output, target)) * n
            if metric is not None:
                metric_sum += float(metric(output, target)) * n
    if total == 0:
        return None, None
    return (metric_sum / total if metric is not None else None), loss_sum / total


# -- results ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """One setting under one seed."""

    seed: int
    status: str = "ok"
    finished: bool = False  # trained (perhaps on less data than asked) and evaluated
    log: FineTuneLog = dataclasses.field(default_factory=FineTuneLog)
    metrics: dict[str, float | None] = dataclasses.field(default_factory=dict)
    val_losses: dict[str, float | None] = dataclasses.field(default_factory=dict)
    layers: list[LayerDrift] = dataclasses.field(default_factory=list)
    modes: dict[str, str] = dataclasses.field(default_factory=dict)
    eval_seconds: float = 0.0
    seconds: float = 0.0


def _mean(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.fmean(got) if got else None


def _std(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.stdev(got) if len(got) > 1 else None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclasses.dataclass
class CompareRow:
    """One setting of a :class:`CompareResult`, over its seeds.

    Attributes:
        setting: the :class:`Setting`.
        runs: one run per seed that started (in the order of ``seeds``).
    """

    setting: Setting
    runs: list[_Run] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.setting.name

    @property
    def status(self) -> str:
        """``"ok"``, or what happened, naming the seed when there are several."""
        notes = [r for r in self.runs if r.status != "ok"]
        if not notes:
            return "ok" if self.runs else "not run"
        first = notes[0]
        where = f" (seed {first.seed})" if len(self.runs) > 1 or len(notes) > 1 else ""
        return first.status + where

    @property
    def finished(self) -> bool:
        """Whether every run trained and was evaluated to a finite metric (a candidate for best)."""
        return bool(self.runs) and all(r.finished for r in self.runs)

    def metric(self, val: str) -> float | None:
        """The mean over seeds of the metric on validation set ``val``."""
        return _mean([r.metrics.get(val) for r in self.runs if r.finished])

    def metric_std(self, val: str) -> float | None:
        return _std([r.metrics.get(val) for r in self.runs if r.finished])

    def val_loss(self, val: str) -> float | None:
        return _finite(_mean([_finite(r.val_losses.get(val)) for r in self.runs if r.finished]))

    @property
    def final_train_loss(self) -> float | None:
        """Mean over seeds of the mean training loss of the last five steps."""
        tails = [statistics.fmean(r.log.losses[-5:]) for r in self.runs if r.log.losses]
        return _mean(tails)

    @property
    def seconds_per_step(self) -> float | None:
        return _mean([r.log.seconds_per_step for r in self.runs])

    @property
    def saved_bytes(self) -> int | None:
        """Activation bytes saved for backward in one training step (first seed)."""
        saved = next((r.log.saved for r in self.runs if r.log.saved is not None), None)
        return None if saved is None else saved.activations

    @property
    def layers(self) -> list[LayerDrift]:
        """Per-layer drift of the first run that has it."""
        return next((r.layers for r in self.runs if r.layers), [])

    def drift(self, what: str) -> tuple[float | None, float | None]:
        """``(max, mean)`` over layers of ``"stats"`` or ``"affine"`` drift (first run)."""
        values = [v for v in (getattr(d, what) for d in self.layers) if v is not None]
        return (max(values), statistics.fmean(values)) if values else (None, None)

    @property
    def modes(self) -> dict[str, str]:
        return next((r.modes for r in self.runs if r.modes), {})


@dataclasses.dataclass
class CompareResult:
    """What :func:`compare` measured. ``print(result)`` gives the table and the suggestion.

    Attributes:
        rows: one :class:`CompareRow` per setting that started, in the order given.
        val_names: the validation sets; the first one ranks the settings.
        metric_name: how the metric is labelled (``"acc"``, ``"loss"``, or the callable's name).
        higher_is_better: the metric's direction.
        steps: the fine-tuning steps asked for.
        seeds: the seeds asked for.
        complete: ``False`` when interrupted (Ctrl-C): ``rows`` hold what finished.
        seconds: wall time of the whole comparison.
    """

    rows: list[CompareRow]
    val_names: list[str]
    metric_name: str
    higher_is_better: bool
    steps: int
    seeds: list[int]
    complete: bool = True
    seconds: float = 0.0
    settings_asked: int = 0

    def row(self, name: str) -> CompareRow:
        """The row of setting ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no setting {name!r}; settings: {[r.name for r in self.rows]}")

    def _ranked(self) -> list[CompareRow]:
        primary = self.val_names[0]
        candidates = [r for r in self.rows if r.finished and r.metric(primary) is not None]
        return sorted(candidates, key=self._primary, reverse=self.higher_is_better)

    def _primary(self, row: CompareRow) -> float:
        """``row``'s metric on the first validation set, for a row of :meth:`_ranked` (which has one)."""
        return cast(float, row.metric(self.val_names[0]))

    @property
    def best(self) -> str | None:
        """The name of the best setting on the first validation set (``None`` when no setting finished)."""
        ranked = self._ranked()
        return ranked[0].name if ranked else None

    def _format_metric(self, value: float | None, std: float | None = None) -> str:
        if value is None:
            return "-"
        percent = self.metric_name == "acc"
        text = f"{value:.1%}" if percent else f"{value:.4g}"
        if std is not None:
            text += f" ± {std:.1%}" if percent else f" ± {std:.2g}"
        return text

    def _format_delta(self, value: float) -> str:
        return f"{value * 100:.1f} points" if self.metric_name == "acc" else f"{value:.3g}"

    @property
    def suggestion(self) -> str:
        """One line: the best setting, by how much, and how sure that is."""
        ranked = self._ranked()
        primary = self.val_names[0]
        label = f"{primary} {self.metric_name}"
        if not ranked:
            return "no setting finished: see the status column."
        best = ranked[0]
        if len(ranked) == 1:
            value = self._format_metric(best.metric(primary))
            return f"{best.name} is the only setting that finished ({label} {value})."
        second = ranked[1]
        delta = abs(self._primary(best) - self._primary(second))
        n = len(self.seeds)
        if n == 1:
            return (f"{best.name} is best by {self._format_delta(delta)} of {label} over {second.name} (one seed: "
                    f"pass seeds=[0, 1, 2] to see how sure that is).")
        spreads = [s for s in (best.metric_std(primary), second.metric_std(primary)) if s is not None]
        spread = max(spreads) if spreads else 0.0
        noise = f"spread {self._format_delta(spread)} over {n} seeds"
        if delta > spread:
            return f"{best.name} is best by {self._format_delta(delta)} of {label} over {second.name} ({noise})."
        close = [r.name for r in ranked[1:] if abs(self._primary(best) - self._primary(r)) <= spread]
        return (f"{best.name} and {', '.join(close)} are within noise ({self._format_delta(delta)} of {label} apart, "
                f"{noise}): choose by time and memory, or run more seeds.")

    def _baseline(self, what: str) -> CompareRow | None:
        """The first row whose ``what`` is not ``None`` (``None``: no such row)."""
        return next((r for r in self.rows if getattr(r, what) is not None), None)

    def _ratio(self, row: CompareRow, what: str) -> float | None:
        base = self._baseline(what)
        value = getattr(row, what)
        if base is None or value is None or not getattr(base, what):
            return None
        return value / getattr(base, what)

    def records(self) -> list[dict[str, Any]]:
        """One plain, JSON-serializable dict per row (non-finite numbers become ``None``)."""
        best = self.best
        out = []
        for row in self.rows:
            s = row.setting
            record: dict[str, Any] = {
                "setting": row.name,
                "best": row.name == best,
                "status": row.status,
                "finished": row.finished,
                "policy": s.policy_label(),
                "prepare": None if s.prepare is None else str(getattr(s.prepare, "__name__", s.prepare)),
                "fold": s.fold,
                **{k: row.modes.get(k) for k in ("train", "eval", "affine")},
                "seeds": [r.seed for r in row.runs],
                "steps": [r.log.steps_done for r in row.runs],
                "metric": {v: {"mean": _finite(row.metric(v)), "std": _finite(row.metric_std(v)),
                               "per_seed": [_finite(r.metrics.get(v)) for r in row.runs]} for v in self.val_names},
                "val_loss": {v: {"mean": row.val_loss(v),
                                 "per_seed": [_finite(r.val_losses.get(v)) for r in row.runs]}
                             for v in self.val_names},
                "train_loss": [[_finite(x) for x in r.log.losses] for r in row.runs],
                "final_train_loss": _finite(row.final_train_loss),
                "saved_bytes": row.saved_bytes,
                "memory_ratio": self._ratio(row, "saved_bytes"),
                "seconds_per_step": row.seconds_per_step,
                "time_ratio": self._ratio(row, "seconds_per_step"),
                "eval_seconds": sum(r.eval_seconds for r in row.runs),
                "seconds": sum(r.seconds for r in row.runs),
            }
            for what in ("stats", "affine"):
                most, mean = row.drift(what)
                record[f"{what}_drift_max"], record[f"{what}_drift_mean"] = _finite(most), _finite(mean)
            record["layers"] = [{**dataclasses.asdict(d), "stats": _finite(d.stats), "affine": _finite(d.affine)}
                                for d in row.layers]
            out.append(record)
        return out

    def to_json(self, path: str | Path) -> str:
        """Write ``{"rows": records(), "best", "suggestion", ...}`` to ``path``; returns the path."""
        data = {
            "best": self.best,
            "suggestion": self.suggestion,
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "validation_sets": self.val_names,
            "steps": self.steps,
            "seeds": self.seeds,
            "complete": self.complete,
            "seconds": round(self.seconds, 2),
            "rows": self.records(),
        }
        Path(path).write_text(json.dumps(data, indent=2, allow_nan=False))
        return str(path)

    def __str__(self) -> str:
        if not self.rows:
            return "no setting ran" + ("" if self.complete else " (interrupted)")
        best = self.best
        header = ["setting", "train()"] + [f"{v} {self.metric_name}" for v in self.val_names]
        with_loss = self.metric_name != "loss"  # (else the metric columns are the validation losses)
        header += [f"{self.val_names[0]} loss"] * with_loss + ["train loss", "time/step", "saved", "stats drift",
                   "affine drift", "status"]
        lines_rows = []
        for row in self.rows:
            cells = [("* " if row.name == best else "  ") + row.name, row.modes.get("train", "-")]
            cells += [self._format_metric(row.metric(v), row.metric_std(v)) for v in self.val_names]
            if with_loss:
                loss = row.val_loss(self.val_names[0])
                cells.append("-" if loss is None else f"{loss:.4g}")
            train = _finite(row.final_train_loss)
            cells.append("-" if train is None else f"{train:.4g}")
            for what in ("seconds_per_step", "saved_bytes"):
                ratio = self._ratio(row, what)
                cells.append("-" if ratio is None else f"{ratio:.2f}x")
            for what in ("stats", "affine"):
                most = _finite(row.drift(what)[0])
                cells.append("-" if most is None else f"{most:.3f}" if most < 1e3 else f"{most:.3g}")
            status = row.status
            cells.append(status if len(status) <= 70 else status[:67] + "...")
            lines_rows.append(cells)
        header[0] = "  " + header[0]
        widths = [max(len(h), *(len(r[i]) for r in lines_rows)) for i, h in enumerate(header)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i in (0, 1, len(cells) - 1) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        lines = [line(header)] + [line(r) for r in lines_rows]
        seeds = f"{len(self.seeds)} seeds" if len(self.seeds) > 1 else f"seed {self.seeds[0]}"
        base_t, base_m = self._baseline("seconds_per_step"), self._baseline("saved_bytes")
        notes = [f"  {self.steps} fine-tuning steps per setting, {seeds}; "
                 f"{'higher' if self.higher_is_better else 'lower'} {self.metric_name} is better"
                 + ("" if len(self.seeds) == 1 else ", mean ± std over seeds")]
        if base_t is not None:
            notes.append(f"  time/step: median wall time of a training step, relative to {base_t.name} "
                         f"({cast(float, base_t.seconds_per_step) * 1e3:.1f} ms)")  # set: see _baseline
        if base_m is not None:
            notes.append(f"  saved: activation memory autograd keeps for backward in one step, relative to "
                         f"{base_m.name} ({cast(int, base_m.saved_bytes) / 1e6:.2f} MB)")  # set: see _baseline
        notes.append("  stats drift: largest move of a BatchNorm layer's running statistics from the start (the mean "
                     "in running stds, or the variance relative to itself)")
        notes.append("  affine drift: largest relative change of a BatchNorm layer's weight and bias (0 = unchanged)")
        if not self.complete:
            notes.append(f"  interrupted: {sum(r.finished for r in self.rows)} of {self.settings_asked} settings "
                         "finished")
        return "\n".join(lines + [""] + notes + ["", f"suggestion: {self.suggestion}"])

    def plot(self, path: str | Path) -> str:
        """Write a PNG: the training-loss curves (mean over seeds) and the metric per setting.

        Raises:
            ImportError: matplotlib is not installed (``pip install 'bnctl[demo]'``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("CompareResult.plot needs matplotlib: pip install 'bnctl[demo]'") from err
        best = self.best
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
        for row in self.rows:
            curves = [r.log.losses for r in row.runs if r.log.losses]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            left.plot(range(1, length + 1), mean, label=row.name, linewidth=2.2 if row.name == best else 1.2)
        left.set_xlabel("step")
        left.set_ylabel("training loss" + (" (mean over seeds)" if len(self.seeds) > 1 else ""))
        left.set_yscale("log")
        left.set_title("fine-tuning")
        left.legend(fontsize=8)
        names = [r.name for r in self.rows]
        width = 0.8 / len(self.val_names)
        scale = 100.0 if self.metric_name == "acc" else 1.0
        for j, val in enumerate(self.val_names):
            means = [(r.metric(val) or 0.0) * scale for r in self.rows]
            stds = [(r.metric_std(val) or 0.0) * scale for r in self.rows]
            bars = right.bar([i + j * width for i in range(len(names))], means, width, yerr=stds, capsize=3,
                             label=val)
            for bar, row in zip(bars, self.rows):
                if row.name == best and j == 0:
                    bar.set_edgecolor("black")
                    bar.set_linewidth(2)
        right.set_xticks([i + 0.4 - width / 2 for i in range(len(names))],
                         [("* " if n == best else "") + n for n in names], rotation=20, ha="right", fontsize=8)
        right.set_ylabel(f"{self.metric_name}{' (%)' if scale == 100 else ''}")
        right.set_title(f"after {self.steps} steps ({'higher' if self.higher_is_better else 'lower'} is better)")
        if len(self.val_names) > 1:
            right.legend(fontsize=8)
        fig.suptitle("bnctl.compare: " + self.suggestion, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path)

    def __repr__(self) -> str:
        return (f"CompareResult(settings={[r.name for r in self.rows]}, best={self.best!r}, "
                f"complete={self.complete})")


# -- compare ---------------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"compare: expected an nn.Module, got {type(model).__name__}.")
    if not batchnorm_layers(model):
        raise ValueError(
            f"compare: expected a model with BatchNorm layers, got a {type(model).__name__} without any: there is "
            "no BatchNorm setting to choose. Pass the model (or the part of it) that holds the BatchNorm layers; "
            "models normalized with LayerNorm or GroupNorm need no BatchNorm setting."
        )


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, or a clear error; the original is never changed."""
    cuda = [p.device for p in (*model.parameters(), *model.buffers()) if p.device.type == "cuda"]
    if cuda:
        size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        free, _total = torch.cuda.mem_get_info(cuda[0])
        if size > free:
            raise RuntimeError(
                f"compare: a copy of the model needs {size / 1e9:.2f} GB on {cuda[0]}, and {free / 1e9:.2f} GB is "
                "free. compare fine-tunes copies and never changes your model, so it stops here: free memory, or "
                "compare on a smaller model or device."
            )
    try:
        return copy.deepcopy(model)
    except Exception as err:  # MemoryError included
        raise RuntimeError(
            f"compare: could not copy the model ({type(err).__name__}: {err}). compare fine-tunes copies and "
            "never changes your model, so it stops here: make the model copyable with copy.deepcopy (no open "
            "files or locks held by modules), or free memory."
        ) from err


def _modes(model: nn.Module) -> dict[str, str]:
    """The train()/eval()/affine behaviour of the BatchNorm layers, as :func:`bnctl.report` reads it (one value
    when all layers agree, else each value with its count)."""
    rows = report(model).layers
    out = {}
    for key in ("train", "eval", "affine"):
        counts: dict[str, int] = {}
        for r in rows:
            counts[getattr(r, key)] = counts.get(getattr(r, key), 0) + 1
        out[key] = next(iter(counts)) if len(counts) == 1 else ", ".join(f"{v} ({n})" for v, n in counts.items())
    return out


def _domain_for(setting: Setting, val: str | None) -> str | None:
    """The domain a fine-tune (``val=None``) or an evaluation of validation set ``val`` runs in."""
    if isinstance(setting.domain, str):
        return setting.domain
    if setting.domain is None or val is None:
        return None
    return setting.domain.get(val)


def _scope(model: nn.Module, name: str | None) -> Any:
    return contextlib.nullcontext() if name is None else domain_scope(model, name)


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _run_setting(run: _Run, model: nn.Module, setting: Setting, train_data: Iterable[Any],
                 val_sets: Mapping[str, Iterable[Any]], *, steps: int, loss: Loss, metric: Metric | None,
                 optimizer: OptimizerFactory | type | None, forward: Forward | None, cycle: bool,
                 tick: Callable[[int, float], None]) -> None:
    """One setting under one seed, on a copy of ``model``; fills ``run`` as it goes."""
    start = time.perf_counter()
    stage = "copying the model"
    try:
        copy_ = _copy(model)
        before = batchnorm_tensors(copy_)
        copy_.eval()
        n = steps if setting.steps is None else setting.steps
        if setting.prepare is not None:
            stage = "prepare"
            prepare = setting.prepare
            if isinstance(prepare, Recalibrate) and prepare.forward is None and forward is not None:
                prepare = Recalibrate(forward)
            torch.manual_seed(run.seed)
            prepare(copy_, _FirstBatches(train_data, steps, cycle))
        stage = "applying the policy"
        if setting.policy is not None:
            apply(copy_, setting.policy, setting.include, setting.exclude)
        if setting.fold:
            fold_model(copy_)
        run.modes = _modes(copy_)
        stage = "fine-tuning"
        torch.manual_seed(run.seed)
        copy_.train()
        with _scope(copy_, _domain_for(setting, None)):
            fine_tune(copy_, train_data, n, loss=loss, optimizer=optimizer, forward=forward, cycle=cycle,
                      measure_memory=True, on_step=tick, log=run.log)
        if run.log.stopped is not None:
            run.status = run.log.stopped
        if not run.log.diverged:
            stage = "evaluation"
            evaluated = time.perf_counter()
            for val, data in val_sets.items():
                with _scope(copy_, _domain_for(setting, val)):
                    value, run.val_losses[val] = _evaluate(copy_, data, loss, metric, forward)
                run.metrics[val] = run.val_losses[val] if metric is None else value  # None: ranked by loss
            run.eval_seconds = time.perf_counter() - evaluated
            primary = next(iter(val_sets))
            value = run.metrics[primary]
            if value is None:
                run.status = f"validation data {primary!r} is empty"
            elif not math.isfinite(value):
                run.status = f"{'metric' if metric is not None else 'validation loss'} is {value} on {primary!r}"
            else:
                run.finished = True
        run.layers = batchnorm_drift(before, batchnorm_tensors(copy_))
    except KeyboardInterrupt:
        where = f" at step {run.log.steps_done + 1}" if stage == "fine-tuning" else f" during {stage}"
        run.status = f"interrupted{where}"
        raise
    except Exception as err:
        logger.info("compare: setting %r failed during %s", setting.name, stage, exc_info=True)
        run.status = f"failed during {stage}: {_one_line(err)}"
    finally:
        run.seconds = time.perf_counter() - start


def _metric(metric: Metric | str | None, higher_is_better: bool | None) -> tuple[Metric | None, str, bool]:
    if metric == "accuracy":
        if higher_is_better is False:
            raise ValueError("compare: accuracy is higher-is-better; pass higher_is_better=None or True.")
        return accuracy, "acc", True
    if metric is None:
        if higher_is_better:
            raise ValueError("compare: metric=None ranks by validation loss, lower is better; pass "
                             "higher_is_better=None or False.")
        return None, "loss", False
    if isinstance(metric, str) or not callable(metric):
        raise ValueError(f"compare: expected metric to be 'accuracy', None (validation loss) or a callable "
                         f"(output, target) -> float, got {metric!r}.")
    name = getattr(metric, "__name__", "metric")
    return metric, "metric" if name == "<lambda>" else name, True if higher_is_better is None else higher_is_better


def compare(
    model: nn.Module,
    train_data: Iterable[Any],
    val_data: Iterable[Any] | Mapping[str, Iterable[Any]],
    *,
    settings: Sequence[str | Policy | Setting | Prepare] = DEFAULT_SETTINGS,
    steps: int = 100,
    loss: Loss = F.cross_entropy,
    metric: Metric | str | None = "accuracy",
    higher_is_better: bool | None = None,
    optimizer: OptimizerFactory | type | None = None,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    forward: Forward | None = None,
    cycle: bool = False,
    progress: bool | None = None,
) -> CompareResult:
    """Fine-tune a copy of ``model`` under each BatchNorm setting and evaluate it: which setting to use, measured.

    For each setting and seed: a deep copy of ``model`` is prepared (see
    :class:`Setting`), fine-tuned for ``steps`` steps with a fresh optimizer
    (:func:`fine_tune`), and evaluated on each validation set in ``eval()``
    (no gradients, no running statistic updated). Every copy starts from the
    same weights and sees the same batches in the same order: before each
    setting torch's random number generator is seeded with the seed and
    ``train_data`` is iterated afresh, so a ``DataLoader`` that shuffles from
    torch's generator, or with its own seeded ``generator``, gives every
    setting the same order (so do dropout and random augmentation drawn from
    torch's generator). ``model`` itself is never changed, and torch's
    generator is left as it was; only one copy exists at a time.

    Measured per setting: the metric and loss on each validation set, the
    training-loss curve, the median wall time of a training step (data
    loading and evaluation excluded), the activation memory autograd keeps for
    backward in one step (:func:`count_saved`), and how far each BatchNorm
    layer's running statistics and weight/bias moved from the start
    (:func:`batchnorm_drift`, recalibration included). Modes are read with
    :func:`bnctl.report`.

    Nothing that goes wrong in one setting stops the others; its row says what
    happened: ``"data ended after k of n steps"`` (``train_data`` is shorter
    than ``steps``: the copy is still evaluated and ranked; ``cycle=True``
    starts the data again instead), ``"diverged at step k (loss nan)"``
    (not evaluated), ``"metric is nan on 'val'"``, ``"failed during
    fine-tuning: TypeError: ..."``. Ctrl-C stops the comparison and returns the
    rows so far (``complete=False``, the interrupted row marked).

    Args:
        model: the model, with its (pretrained) weights and BatchNorm layers.
        train_data: an iterable of ``(input, target, ...)`` batches (e.g. a
            ``DataLoader``), iterated afresh for every setting and seed.
        val_data: an iterable of batches, or a mapping ``{name: data}`` of
            several validation sets (the first one ranks the settings; the
            others are reported, e.g. the source domain after adapting to a
            target, to see forgetting).
        settings: what to compare (default :data:`DEFAULT_SETTINGS`): preset
            names and short forms (``"frozen+fold"``,
            ``"recalibrate+frozen_stats"``: see :meth:`Setting.parse`),
            :class:`bnctl.Policy` objects, :class:`Setting` objects, or
            ``prepare(model, data)`` callables.
        steps: fine-tuning steps per setting (a :class:`Setting` may override).
        loss: ``loss(output, target) -> Tensor``, for training and validation
            (default: cross-entropy, for classification).
        metric: ``"accuracy"`` (default: top-1, higher is better), ``None``
            (rank by validation loss, lower is better) or a callable
            ``metric(output, target) -> float`` averaged over samples (each
            batch weighted by its size; higher is better unless
            ``higher_is_better=False``).
        higher_is_better: the direction of a callable ``metric``.
        optimizer: an optimizer class (built with its defaults) or a factory
            ``params -> Optimizer``, rebuilt for each copy on its parameters
            that require grad (default :func:`default_optimizer`: Adam, lr
            1e-4). Use ``functools.partial(torch.optim.SGD, lr=1e-3,
            momentum=0.9)`` to set options. Which setting is best can depend
            on it: compare with the optimizer you will train with.
        seed: the seed of every setting.
        seeds: several seeds: every setting runs once per seed, and the table
            gives mean ± std, and the suggestion says whether the best setting
            wins by more than that spread. Only what draws from torch's
            generator varies with the seed (shuffling, dropout, augmentation,
            random initialization in ``prepare``): a fixed data order gives
            the same result for every seed.
        forward: ``forward(model, batch) -> (output, target)`` for batches
            that are not ``(input, target, ...)`` tuples.
        cycle: start ``train_data`` again when it ends before ``steps``.
        progress: a tqdm bar over settings × steps (``None``: when stderr is a
            terminal and tqdm is installed).

    Returns:
        A :class:`CompareResult`: ``print`` it, or use ``.best``,
        ``.records()``, ``.to_json(path)``, ``.plot(path)``.

    Raises:
        ValueError: a model without BatchNorm layers, an unknown preset, bad
            ``steps``/``seeds``/``metric``, duplicate setting names (all
            before any work).
        RuntimeError: the model cannot be copied (the original is not touched).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 3))
        >>> x = torch.randn(96, 4); y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        >>> train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
        >>> result = compare(model, train, [(x[64:], y[64:])], settings=["torch", "frozen"], steps=8, cycle=True)
        >>> [row.name for row in result.rows], result.best in ("torch", "frozen")
        (['torch', 'frozen'], True)
    """
    _check_model(model)
    parsed = [as_setting(s, i) for i, s in enumerate(settings)]
    if not parsed:
        raise ValueError("compare: expected at least one setting, got none.")
    names = [s.name for s in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"compare: expected unique setting names, got {duplicates} more than once. Give "
                         "bnctl.Setting(name, ...) objects distinct names.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"compare: expected steps to be an int >= 1, got {steps!r}.")
    run_seeds = [seed] if seeds is None else list(seeds)
    if not run_seeds or not all(isinstance(s, int) for s in run_seeds):
        raise ValueError(f"compare: expected seeds to be a non-empty sequence of ints, got {seeds!r}.")
    metric_fn, metric_name, higher = _metric(metric, higher_is_better)
    if optimizer is not None and not callable(optimizer):
        raise TypeError(f"compare: expected optimizer to be an optimizer class or a factory params -> Optimizer, "
                        f"got {type(optimizer).__name__}.")
    val_sets = dict(val_data) if isinstance(val_data, Mapping) else {"val": val_data}
    if not val_sets:
        raise ValueError("compare: expected at least one validation set, got an empty mapping.")
    for s in parsed:
        if isinstance(s.domain, Mapping) and not set(s.domain) <= set(val_sets):
            raise ValueError(f"Setting {s.name!r}: domain names validation sets {sorted(set(s.domain) - set(val_sets))}"
                             f" that are not in val_data {list(val_sets)}.")
    _copy(model)  # can it be copied at all? Better to know before minutes of work.

    result = CompareResult([], list(val_sets), metric_name, higher, steps, run_seeds,
                           settings_asked=len(parsed))
    total = sum(steps if s.steps is None else s.steps for s in parsed) * len(run_seeds)
    bar = progress_bar(total, "bnctl compare", progress)
    started = time.perf_counter()
    devices = sorted({p.device.index or 0 for p in (*model.parameters(), *model.buffers())
                      if p.device.type == "cuda"})

    def tick(_step: int, _loss: float) -> None:
        if bar is not None:
            bar.update(1)

    try:
        with torch.random.fork_rng(devices=devices):
            for setting in parsed:
                row = CompareRow(setting)
                result.rows.append(row)
                if bar is not None:
                    bar.set_description(f"bnctl compare: {setting.name}")
                for run_seed in run_seeds:
                    run = _Run(run_seed)
                    row.runs.append(run)
                    _run_setting(run, model, setting, train_data, val_sets, steps=steps, loss=loss,
                                 metric=metric_fn, optimizer=optimizer, forward=forward, cycle=cycle, tick=tick)
                logger.info("compare: %s: %s", setting.name, row.status)
    except KeyboardInterrupt:
        result.complete = False
    finally:
        if bar is not None:
            bar.close()
        result.seconds = time.perf_counter() - started
    return result
