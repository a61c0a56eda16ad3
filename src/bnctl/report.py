"""What every BatchNorm layer of a model does, and the known traps.

:func:`report` lists, per layer, its effective behaviour under ``train()``
and under ``eval()`` (read from the same plan the layers' forwards read),
whether the affine part learns, momentum, eps, counters, and warnings for
the classic mistakes. Given a batch, it also measures how far
the batch's statistics are from the running ones, changing nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .apply import batchnorm_layers
from .distributed import active
from .frozen import is_frozen_batchnorm
from .modules import check_materialized, display_name, is_uninitialized, layer_plan, layer_policy, layer_state
from .policy import Plan, Step, make_plan
from .recalibrate import call_model
from .state import LayerTensors, domains, never_updated
from .updates import unchanged

__all__ = ["LayerReport", "Report", "report"]


@dataclass
class LayerReport:
    """One BatchNorm layer's row of a :class:`Report` (all plain Python values)."""

    name: str
    cls: str
    policy: str
    train: str
    eval: str
    affine: str
    momentum: float | None
    eps: float
    num_batches_tracked: int | None
    skipped_updates: int
    domains: list[str]
    sync: str = "-"
    warnings: list[str] = field(default_factory=list)
    mean_shift: float | None = None
    log_var_ratio: float | None = None
    train_eval_gap: float | None = None


@dataclass
class Report:
    """Per-layer records; ``str()`` gives an aligned table, :meth:`records` a list of dicts."""

    layers: list[LayerReport]

    def records(self) -> list[dict[str, Any]]:
        """The report as a list of plain dicts (for JSON and programs)."""
        return [asdict(layer) for layer in self.layers]

    @property
    def warnings(self) -> list[str]:
        """Every warning, prefixed with its layer's name."""
        return [f"{layer.name}: {w}" for layer in self.layers for w in layer.warnings]

    def __str__(self) -> str:
        if not self.layers:
            return "no BatchNorm layers"
        with_batch = any(layer.mean_shift is not None for layer in self.layers)
        header = ["layer", "class", "policy", "train()", "eval()", "affine", "momentum", "eps",
                  "batches", "skipped", "sync"]
        if with_batch:
            header += ["mean shift", "log var ratio", "train/eval gap"]
        rows = []
        for r in self.layers:
            row = [r.name, r.cls, r.policy, r.train, r.eval, r.affine,
                   "None" if r.momentum is None else f"{r.momentum:g}", f"{r.eps:g}",
                   "-" if r.num_batches_tracked is None else str(r.num_batches_tracked),
                   str(r.skipped_updates), r.sync]
            if with_batch:
                row += ["-" if v is None else f"{v:.3f}"
                        for v in (r.mean_shift, r.log_var_ratio, r.train_eval_gap)]
            rows.append(row)
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        warnings = self.warnings
        lines.append(f"{len(self.layers)} BatchNorm layer(s), {len(warnings)} warning(s)")
        lines += [f"  ! {w}" for w in warnings]
        return "\n".join(lines)


def _mode_text(step: Step) -> str:
    normalize = step.normalize if isinstance(step.normalize, str) else f"blend({step.normalize:g})"
    return f"{normalize}/{step.update}"


def _affine_text(layer: _BatchNorm) -> str:
    params = list(layer.parameters(recurse=False))
    if not params:
        return "-"
    flags = {p.requires_grad for p in params}
    return "learns" if flags == {True} else "frozen" if flags == {False} else "partly"


def _traps(layer: _BatchNorm) -> list[str]:
    found = []
    plan = layer_plan(layer)
    frozen_ema = plan.train.update == "ema" and plan.train.momentum == 0
    if frozen_ema and plan.train.normalize != "running":
        found.append(
            "momentum=0 keeps the running statistics, but train() still normalizes with batch "
            "statistics (and counts batches in num_batches_tracked); for running statistics in "
            "train() use the 'frozen' or 'frozen_stats' preset"
        )
    elif _affine_text(layer) == "frozen" and plan.train.update != "none" and not frozen_ema:
        found.append(
            "weight/bias have requires_grad=False but the running statistics still update in "
            "train(); use the 'frozen' preset to freeze both"
        )
    learn, flags = layer_policy(layer).learn_affine, _affine_text(layer)
    if learn is False and flags in ("learns", "partly"):
        found.append(
            "weight/bias have requires_grad=True, but the policy freezes them: they get no gradient. "
            "Something set requires_grad after bnctl.apply (e.g. Lightning's BaseFinetuning.make_trainable); "
            "apply a policy that learns (e.g. 'frozen_stats') to train them"
        )
    elif learn is True and flags in ("frozen", "partly"):
        found.append(
            "the policy learns weight/bias, but requires_grad=False was set after bnctl.apply: they get "
            "no gradient"
        )
    if never_updated(layer.running_mean, layer.running_var, layer.num_batches_tracked):
        found.append("running statistics never updated (all 0 and 1): load pretrained "
                     "weights or run bnctl.recalibrate")
    if layer.running_mean is not None:
        found += _statistics_warnings(layer)
    if not layer.track_running_stats and layer.running_mean is not None:
        found += _untracked_trap(layer, plan)
    momentum = plan.train.momentum
    if momentum is not None and 0.9 <= momentum < 1.0:
        found.append(f"momentum={momentum:g} looks like a Keras/Flax decay; PyTorch's momentum "
                     f"is the weight of the new batch (bnctl.momentum_from_decay({momentum:g}) "
                     f"= {1 - momentum:g})")
    skipped = getattr(layer, "skipped_updates", 0)
    if skipped:
        found.append(f"{skipped} running update(s) skipped for non-finite batch statistics")
    return found


def _untracked_trap(layer: _BatchNorm, plan: Plan) -> list[str]:
    """What switching ``track_running_stats`` off after construction changed, if anything (Lightning's
    ``BaseFinetuning.freeze_module`` does it)."""
    tracked = make_plan(layer_policy(layer), momentum=layer.momentum, track_running_stats=True,
                        has_running_stats=True)
    lost = [mode for mode, now, was in (("train()", plan.train, tracked.train), ("eval()", plan.eval, tracked.eval))
            if now.update == "none" and was.update != "none"]
    if not lost:
        return []
    stale = [mode for mode, step in (("train()", plan.train), ("eval()", plan.eval)) if step.normalize == "running"]
    return [f"track_running_stats was switched off after construction: the running statistics no longer update "
            f"in {' and '.join(lost)}" + (f", and {' and '.join(stale)} normalize{'s' * (len(stale) == 1)} with "
                                           "those stale buffers" if stale else "")]


def _shift(layer: _BatchNorm, x: Tensor) -> tuple[float | None, float | None, float | None]:
    if layer.running_mean is None or x.shape[0] * x[0, 0].numel() < 2:
        return None, None, None
    state = layer_state(layer)
    if is_frozen_batchnorm(layer):
        rm, rv, w, b = layer.running_mean, layer.running_var, layer.weight, layer.bias
    else:
        rm, rv, _nbt, w, b = LayerTensors.of(layer) if state is None else state.tensors(layer)
    dims = [0, *range(2, x.dim())]
    x = x.detach().double()
    var_b, mean_b = torch.var_mean(x, dims, unbiased=False)
    rm, rv = rm.double(), rv.double()
    mean_shift = ((mean_b - rm).abs() / torch.sqrt(rv + layer.eps)).mean().item()
    log_ratio = torch.log((var_b + layer.eps) / (rv + layer.eps)).abs().mean().item()
    w = None if w is None else w.detach().double()
    b = None if b is None else b.detach().double()
    y_train = F.batch_norm(x, None, None, w, b, True, 0.0, layer.eps)
    y_eval = F.batch_norm(x, rm, rv, w, b, False, 0.0, layer.eps)
    gap = ((y_train - y_eval).norm() / y_eval.norm().clamp_min(1e-12)).item()
    return mean_shift, log_ratio, gap if math.isfinite(gap) else None


def report(
    model: nn.Module, batch: Any = None, *, forward: Callable[[nn.Module, Any], Any] | None = None
) -> Report:
    """Report every BatchNorm layer's behaviour, and with a batch, its statistics shift.

    With ``batch`` (a tensor, a tuple/list whose first element is the input,
    or a dict of keyword arguments; or anything ``forward(model, batch)``
    takes), the model runs once in its current mode, under ``no_grad`` and
    with no running statistic updated, and each layer's input gives: the
    standardized mean shift (mean over channels of ``|mean_B - running_mean|
    / sqrt(running_var + eps)``), the log variance ratio (mean of
    ``|log((var_B + eps) / (running_var + eps))|``) and the train/eval output
    gap (``||y_batch - y_running|| / ||y_running||``). No buffer or flag
    changes, whatever the layers' classes.

    Returns:
        A :class:`Report`: print it, or use ``.records()``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3, momentum=0.99))
        >>> r = report(model, torch.randn(8, 4))
        >>> r.layers[0].train, r.layers[0].eval, len(r.warnings)
        ('batch/ema', 'running/none', 2)
    """
    layers = batchnorm_layers(model)
    inputs = {} if batch is None else _layer_inputs(model, layers, batch, forward or call_model)
    rows = []
    for name, layer in layers:
        row = _row(display_name(name, layer), layer)
        if name in inputs:
            row.mean_shift, row.log_var_ratio, row.train_eval_gap = _shift(layer, inputs[name])
        rows.append(row)
    return Report(rows)


def _row(name: str, layer: _BatchNorm) -> LayerReport:
    if is_frozen_batchnorm(layer):
        return _frozen_row(name, layer)
    row = LayerReport(
        name=name, cls=type(layer).__name__, policy=layer_policy(layer).label,
        train="-", eval="-", affine="-", momentum=layer.momentum, eps=layer.eps, num_batches_tracked=None,
        skipped_updates=getattr(layer, "skipped_updates", 0), domains=domains(layer),
    )
    if is_uninitialized(layer):
        row.warnings.append("uninitialized lazy layer: run one forward pass to see its behaviour")
        return row
    plan = layer_plan(layer)
    row.train, row.eval, row.momentum = _mode_text(plan.train), _mode_text(plan.eval), plan.train.momentum
    row.affine = _affine_text(layer)
    if layer.num_batches_tracked is not None:
        row.num_batches_tracked = int(layer.num_batches_tracked)
    row.warnings = _traps(layer)
    row.sync = _sync_text(layer)
    return row


def _sync_text(layer: _BatchNorm) -> str:
    """Over which ranks the layer's batch statistics are computed: ``-`` (its own batch), or the
    group and its size."""
    if not (layer_policy(layer).sync or isinstance(layer, nn.SyncBatchNorm)):
        return "-"
    if not active():
        return "no process group"
    state = layer_state(layer)
    group = state.sync_group(layer) if state is not None else getattr(layer, "process_group", None)
    world = torch.distributed.group.WORLD
    name = "world" if group is None or group is world else "group"
    return f"{name} ({torch.distributed.get_world_size(group)} ranks)"


def _frozen_row(name: str, layer: nn.Module) -> LayerReport:
    """A buffers-only FrozenBatchNorm2d: running statistics in both modes, nothing learns or updates."""
    row = LayerReport(
        name=name, cls=type(layer).__name__, policy="-", train="running/none", eval="running/none",
        affine="buffers", momentum=None, eps=layer.eps, num_batches_tracked=None, skipped_updates=0,
        domains=domains(layer),
    )
    row.warnings += _statistics_warnings(layer)
    return row


def _statistics_warnings(layer: nn.Module) -> list[str]:
    """Running statistics no forward can use: non-finite values, a negative variance."""
    found = []
    bad = [k for k in ("running_mean", "running_var") if not torch.isfinite(getattr(layer, k)).all()]
    if bad:
        found.append(f"non-finite values in {', '.join(bad)}")
    negative = int((layer.running_var < 0).sum())
    if negative:
        found.append(f"negative running_var in {negative} channel(s): normalizing takes its square root (NaN or "
                     "huge outputs); load sound statistics or run bnctl.recalibrate")
    return found


def _layer_inputs(model: nn.Module, layers: list[tuple[str, _BatchNorm]], batch: Any,
                  call: Callable[[nn.Module, Any], Any]) -> dict[str, Tensor]:
    """Each layer's input on ``batch``, from one forward that changes no statistics."""
    for name, layer in layers:
        check_materialized(display_name(name, layer), layer)
    inputs: dict[str, Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, layer in layers
    ]
    try:
        with torch.no_grad(), unchanged(layers):
            call(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs
