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
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .apply import batchnorm_layers
from .distributed import active
from .ecosystem import is_frozen_batchnorm
from .modules import check_materialized, display_name, is_uninitialized, layer_plan, layer_policy, layer_state
from .policy import Plan, Step, make_plan
from .recalibrate import call_model
from .scopes import unchanged
from .state import LayerTensors, domains, never_updated

__all__ = ["LOG_VAR_RATIO", "MEAN_SHIFT", "TRAIN_EVAL_GAP", "LayerReport", "Report", "checkpoint_report", "report"]

MEAN_SHIFT = 0.5
"""Flag a layer whose standardized mean shift exceeds this: on average over channels the batch mean lies half a
running standard deviation or more from the running mean. A batch of the data the statistics came from stays
near its sampling noise, about ``0.8 / sqrt(n)`` for ``n`` values per channel (0.03 for a batch of 32 at 7×7);
the threshold is raised to three times that noise for small batches, so noise alone is not flagged."""

LOG_VAR_RATIO = math.log(2.0)
"""Flag a layer whose mean ``|log(var_B / running_var)|`` exceeds this: the batch variance differs from the
running one by a factor of 2 or more, so normalized activations are off in scale by ``sqrt(2)`` or more. Sampling
noise of the log of a variance is about ``sqrt(2 / (n - 1))``; the threshold is raised to three times that (times
0.8, as for the mean) for small batches."""

TRAIN_EVAL_GAP = 0.5
"""Flag a layer whose outputs with batch and with running statistics differ by half their norm or more: train()
and eval() compute different functions there, so what is measured in eval() does not describe training. From
sampling noise alone the gap is about ``sqrt(1.5 / n)``; the threshold is raised to three times that for small
batches."""

ADVICE = ("statistics far from this data: recalibrate on data like it (bnctl.recalibrate(model, loader); or "
          "bnctl.add_domains(model, 'target') then recalibrate(..., domain='target') to keep the current ones), "
          "or, where each batch is its own shift, normalize with test-batch statistics (the 'test_time' preset)")
"""The one-line advice given with a flagged shift."""


@dataclass
class LayerReport:
    """One BatchNorm layer's row of a :class:`Report` (all plain Python values).

    ``domains`` are the layer's sets of statistics, ``domain`` the one its forwards use now (the one chosen
    by an enclosing ``bnctl.domain`` block, else ``"default"``; in a mixed-domain block ``"mixed(a, b)"``,
    the domains its labels route to); ``num_batches_tracked`` and the traps are those of the domain the
    layer's own attributes show (the single-domain selection). ``train()`` shows ghost batches as
    ``ghost(k)/update``.
    """

    name: str
    cls: str
    policy: str
    train: str
    eval: str
    affine: str
    momentum: float | None
    eps: float | None
    num_batches_tracked: int | None
    skipped_updates: int
    domains: list[str]
    sync: str = "-"
    domain: str = "default"
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
        saved = all(layer.eps is None for layer in self.layers)  # from a checkpoint: no model, no policy
        header = ["layer", "class", "policy", "train()", "eval()", "affine", "momentum", "eps",
                  "batches", "skipped", "sync"]
        with_domains = any(len(layer.domains) > 1 for layer in self.layers)
        if with_domains and not saved:  # the domain a forward uses now (inside bnctl.domain: the chosen one)
            header.insert(3, "domain")
        if saved:
            header = ["layer", "domain", "affine", "batches"]
        if with_batch:
            header += ["mean shift", "log var ratio", "train/eval gap"]
        rows = []
        for r in self.layers:
            batches = "-" if r.num_batches_tracked is None else str(r.num_batches_tracked)
            row = [r.name, r.cls, r.policy, r.train, r.eval, r.affine,
                   "None" if r.momentum is None else f"{r.momentum:g}", f"{r.eps:g}" if r.eps is not None else "-",
                   batches, str(r.skipped_updates), r.sync]
            if with_domains and not saved:
                row.insert(3, r.domain if len(r.domains) > 1 else "-")
            if saved:
                row = [r.name, r.domain, r.affine, batches]
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
    if step.ghost:
        normalize = f"ghost({step.ghost})"
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
    found += _renorm_warmup(plan, layer.num_batches_tracked)
    skipped = getattr(layer, "skipped_updates", 0)
    if skipped:
        found.append(f"{skipped} running update(s) skipped for non-finite batch statistics")
    return found


def _renorm_warmup(plan: Plan, num_batches_tracked: Tensor | None) -> list[str]:
    """Batch Renormalization before its warm-up starts: exactly batch-statistics BatchNorm (``torch``)."""
    if plan.train.normalize != "renorm" or plan.train.renorm is None or num_batches_tracked is None:
        return []
    start, done = plan.train.renorm[2][0], int(num_batches_tracked)
    if done >= start:
        return []
    return [f"Batch Renormalization is in its warm-up: until num_batches_tracked reaches {start} (now {done}) "
            "r = 1 and d = 0, so train() is exactly the 'torch' preset, and a fine-tune shorter than "
            f"{start - done} more updates never renormalizes. To start now: bnctl.apply(model, "
            "dataclasses.replace(bnctl.PRESETS['renorm'], renorm_warmup=(0, 1000)))"]


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


def _shift_warning(mean_shift: float | None, log_ratio: float | None, gap: float | None, n: int) -> list[str]:
    """The shift measures that pass their thresholds (:data:`MEAN_SHIFT`, :data:`LOG_VAR_RATIO`,
    :data:`TRAIN_EVAL_GAP`), with :data:`ADVICE`; nothing if none does."""
    noise = 0.8 / math.sqrt(max(n - 1, 1))
    limits = (("mean shift", mean_shift, max(MEAN_SHIFT, 3 * noise)),
              ("log var ratio", log_ratio, max(LOG_VAR_RATIO, 3 * noise * math.sqrt(2))),
              ("train/eval gap", gap, max(TRAIN_EVAL_GAP, 3 * math.sqrt(1.5 / max(n - 1, 1)))))
    over = [f"{what} {value:.3f} > {limit:.3g}" for what, value, limit in limits
            if value is not None and not value <= limit]
    return [f"{ADVICE} ({', '.join(over)})"] if over else []


def _shift(layer: _BatchNorm, x: Tensor) -> tuple[float | None, float | None, float | None]:
    if layer.running_mean is None or x.shape[0] * x[0, 0].numel() < 2:
        return None, None, None
    state = layer_state(layer)
    rm: Tensor | None
    rv: Tensor | None
    w: Tensor | None
    b: Tensor | None
    if is_frozen_batchnorm(layer):
        rm, rv, w, b = layer.running_mean, layer.running_var, layer.weight, layer.bias
    else:
        rm, rv, _nbt, w, b = LayerTensors.of(layer) if state is None else state.tensors(layer)
    if rm is None or rv is None:  # (no running statistics: checked above)
        return None, None, None
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
    changes, whatever the layers' classes. A layer past a threshold
    (:data:`MEAN_SHIFT` 0.5, :data:`LOG_VAR_RATIO` log 2, :data:`TRAIN_EVAL_GAP`
    0.5; each raised to three times its sampling noise for a small batch;
    their reasons in their docstrings) gets a warning with what to do.

    Returns:
        A :class:`Report`: print it, or use ``.records()``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3, momentum=0.99))
        >>> r = report(model, torch.randn(8, 4))
        >>> r.layers[0].train, r.layers[0].eval, len(r.warnings)  # a Keras-like momentum, never updated, shifted
        ('batch/ema', 'running/none', 3)
    """
    layers = batchnorm_layers(model)
    inputs = {} if batch is None else _layer_inputs(model, layers, batch, forward or call_model)
    rows = []
    for name, layer in layers:
        row = _row(display_name(name, layer), layer)
        if name in inputs:
            x = inputs[name]
            row.mean_shift, row.log_var_ratio, row.train_eval_gap = _shift(layer, x)
            n = x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 0
            row.warnings += _shift_warning(row.mean_shift, row.log_var_ratio, row.train_eval_gap, n)
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
    state = layer_state(layer)
    if state is not None and state.domain in row.domains:
        row.domain = state.domain
    if state is not None and state.routing is not None:  # a mixed-domain block: the domains its labels name
        row.domain = state.routing.describe(layer)
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
        affine="buffers", momentum=None, eps=cast(float, layer.eps), num_batches_tracked=None, skipped_updates=0,
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
    running_var = cast(Tensor, layer.running_var)  # (the callers' layers have running statistics)
    negative = int((running_var < 0).sum())
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


_CHECKPOINT_ADVICE = (  # (what checkpoint.check_checkpoint says, what to do), first match wins
    ("expected", "not a BatchNorm state a torch layer can load: re-save it with model.state_dict()"),
    ("never updated", "load the pretrained statistics, or compute them with bnctl.recalibrate(model, loader) "
                      "before normalizing with them ('frozen', eval())"),
    ("non-finite", "a forward normalizing with these gives NaN and no EMA update can repair them: rebuild them "
                   "with bnctl.recalibrate(model, loader)"),
    ("negative running_var", "rebuild the statistics with bnctl.recalibrate(model, loader)"),
    ("near-zero running_var", "channels that were constant in the data the statistics came from: normalizing "
                              "divides by about sqrt(eps), so any change there is amplified; recalibrate on "
                              "representative data, or check that those channels are dead"),
    ("near-zero weight", "channels switched off (pruned, or driven to zero by weight decay): fine if intended"),
    ("extreme values", "likely an overflow while training (mixed precision?): recalibrate on data"),
)


def _checkpoint_advice(problem: str) -> str:
    advice = next((a for key, a in _CHECKPOINT_ADVICE if key in problem), "")
    return f"{problem}: {advice}" if advice else problem


def checkpoint_report(state: dict[str, Tensor]) -> Report:
    """:func:`report` for a state dict without its model: per BatchNorm layer and bnctl domain found by its keys
    (:func:`bnctl.checkpoint_files.check_checkpoint`), the batches tracked, and each problem with what to do.

    A checkpoint holds no policy, momentum or eps: those columns stay empty (``None``/``"-"``). For a
    model's policies, traps and statistics shift, load it and call :func:`report`.

    Example:
        >>> state = torch.nn.Sequential(torch.nn.BatchNorm1d(3)).state_dict()
        >>> print(checkpoint_report(state))  # doctest: +NORMALIZE_WHITESPACE
        layer  domain   affine  batches
        0      default  yes     0
        1 BatchNorm layer(s), 1 warning(s)
          ! 0: statistics never updated (all 0 and 1): load the pretrained statistics, or compute them with
            bnctl.recalibrate(model, loader) before normalizing with them ('frozen', eval())
    """
    from .checkpoint_files import check_checkpoint

    rows = []
    for check in check_checkpoint(state):
        prefix = "" if check.name == "<root>" else check.name + "."
        suffix = "" if check.domain == "default" else f"__{check.domain}"
        affine = "yes" if prefix + "weight" + suffix in state or prefix + "weight" in state else "no"
        row = LayerReport(name=check.name, cls="-", policy="-", train="-", eval="-", affine=affine, momentum=None,
                          eps=None, num_batches_tracked=check.num_batches_tracked, skipped_updates=0,
                          domains=[check.domain], domain=check.domain)
        row.warnings = [_checkpoint_advice(p) for p in check.problems]
        rows.append(row)
    return Report(rows)
