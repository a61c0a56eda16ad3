"""Recompute running statistics over data (AdaBN, precise BN, after SWA/pruning).

During the pass the targeted BatchNorm layers normalize with batch statistics
and pool every batch exactly (count, mean, M2 in float64); every other
BatchNorm layer keeps its mode and updates nothing, and every other module
keeps its mode (dropout stays off in a model in eval). The population
statistics are written once, at the end, into the layers that saw values;
nothing is written if the pass fails, and everything else is restored in
``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .apply import Selector, batchnorm_layers
from .distributed import active
from .domains import layers_with
from .ecosystem import Swap, is_frozen_batchnorm, swap_in, swap_out
from .guard import assign_running_
from .modules import check_materialized, display_name
from .policy import PRESETS
from .scopes import domain as domain_scope
from .scopes import pooling, unchanged, using_layers
from .state import LayerTensors, Pools, domains, warn_in_user_code
from .stats import Accumulator, BatchAverage

__all__ = ["Options", "call_model", "progress_bar", "recalibrate"]

logger = logging.getLogger(__name__)

PASS = dataclasses.replace(PRESETS["recalibrate"], learn_affine=None, name="recalibrate_pass")
"""The policy of targeted layers during a pass: the ``recalibrate`` preset (batch statistics in
train() and eval(), cumulative update), leaving ``requires_grad`` alone; its updates go to a pool."""

_ESTIMATORS = {"exact": Accumulator, "per_batch": BatchAverage}


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: a tensor, a tuple/list whose first element is the input, or a
    dict of keyword arguments."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        f"expected each batch to be a tensor, a tuple/list whose first element is the input, "
        f"or a dict of keyword arguments, got {type(batch).__name__}. Pass "
        "forward=lambda model, batch: ... to say how to call the model."
    )


def progress_bar(total: int | None, desc: str, enabled: bool | None, iterable: Iterable[Any] | None = None) -> Any:
    """A tqdm bar, or ``None``: by default only when stderr is a terminal and tqdm is installed.

    ``enabled=True`` without tqdm warns and gives ``None``.
    """
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if enabled:
            warnings.warn(
                "progress=True needs tqdm: pip install 'bnctl[progress]'. Continuing without.",
                stacklevel=3,
            )
        return None
    return tqdm(iterable, total=total, desc=desc, leave=False)


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    layers: Selector = None,
    exclude: Selector = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    strict: bool = True,
    progress: bool | None = None,
    domain: str | None = None,
    estimator: str = "exact",
    sync: bool = False,
    process_group: Any = None,
) -> list[str]:
    """Recompute the running statistics of BatchNorm layers over ``data``, exactly.

    Behaviour contract: during the pass the targeted layers normalize with
    batch statistics and merge each batch's (count, mean, M2) in float64
    (Chan et al.'s parallel algorithm). Afterwards ``running_mean`` and
    ``running_var`` (unbiased) are the population statistics of every value
    each layer saw, and ``num_batches_tracked`` is the number of batches
    they come from. For the first BatchNorm layer the result does not depend
    on how the data is split into batches; deeper layers can, because the
    layers before them normalize with batch statistics during the pass (as in
    fvcore's precise BN). Unlike ``torch.optim.swa_utils.update_bn`` (a
    ``momentum=None`` average of per-batch unbiased variances that puts the
    whole model in train mode) no other module changes mode, other
    BatchNorm layers update nothing, and the variance includes the spread
    between batch means. Runs under ``torch.no_grad()``, one forward per batch.

    Statistics are written once, after the pass, into each targeted layer
    that saw values; a layer that saw none (never reached, or only empty
    batches) keeps its statistics and ``num_batches_tracked`` and is not in
    the result. If the pass fails or is interrupted (``KeyboardInterrupt``
    included) nothing is written, and everything else it changed (policies,
    classes, flags) is restored in ``finally``: the model is left exactly as
    it was.

    Args:
        model: the model.
        data: an iterable of batches: tensors, tuples/lists whose first
            element is the input, or dicts of keyword arguments.
        num_batches: use this many batches (``None``: all of ``data``).
        layers: which BatchNorm layers (``fnmatch`` pattern(s) or a predicate
            ``(name, module) -> bool``); default all that track running
            statistics (layers whose ``track_running_stats`` was switched off
            are skipped with a warning).
        exclude: BatchNorm layers to leave alone (same forms).
        forward: ``forward(model, batch)`` for batches of any other form.
        strict: raise if there is no data, or a targeted layer saw no values
            (else warn).
        progress: show a tqdm bar (``None``: when stderr is a terminal and tqdm is installed).
        domain: recalibrate this domain's statistics (see :func:`bnctl.domain`),
            in the layers that have it; other domains, other layers and every
            parameter stay bit-identical (AdaBN).
        estimator: ``"exact"`` (population statistics, above) or
            ``"per_batch"``: the average of per-batch means and of per-batch
            unbiased variances, what ``torch.optim.swa_utils.update_bn`` and
            pycls compute. It leaves out the spread between batch means, so it
            underestimates the variance when batches differ (small or
            non-i.i.d. batches), and it depends on the batch size.
        sync: with an initialized ``torch.distributed`` process group, each
            rank passes its own ``data`` (layers normalize with that rank's
            batches on the way through), and at the end the statistics of
            every rank's data are merged (one collective per layer and
            domain) and written on every rank: ranks may have different
            numbers of batches, or none. Every rank must call it.
        process_group: the group to merge over (default: the world group).

    Returns:
        The qualified names of the layers that were recalibrated.

    Raises:
        ValueError: ``data`` has fewer than ``num_batches`` batches, no layer
            is selected, an uninitialized lazy layer is, or (``strict``) there
            is no data or a targeted layer saw no values.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
        >>> data = [torch.randn(16, 4) for _ in range(5)]
        >>> recalibrate(model, data)
        ['1']
        >>> int(model[1].num_batches_tracked), model.training
        (5, False)
    """
    options = Options(num_batches, layers, exclude, forward or call_model, strict, progress, domain, estimator,
                      sync, process_group)
    with _standing_in(model, _targets(model, options)) as targets:
        pass_ = _merge(_gather(model, data, targets, options), targets, options)
        with torch.no_grad():
            done = [display_name(name, layer) for (name, layer), pool in zip(targets, pass_.pools)
                    if _write(layer, pool)]
    logger.info("recalibrated %d BatchNorm layers over %d batches", len(done), pass_.seen)
    return done


@dataclasses.dataclass(frozen=True)
class Options:
    """:func:`recalibrate`'s options (its arguments of the same names), checked when made."""

    num_batches: int | None = None
    layers: Selector = None
    exclude: Selector = None
    forward: Callable[[nn.Module, Any], Any] = call_model
    strict: bool = True
    progress: bool | None = None
    domain: str | None = None
    estimator: str = "exact"
    sync: bool = False
    process_group: Any = None

    def __post_init__(self) -> None:
        if self.num_batches is not None and self.num_batches < 1:
            raise ValueError(f"expected num_batches >= 1 or None, got {self.num_batches}.")
        if self.estimator not in _ESTIMATORS:
            raise ValueError(f"expected estimator one of {sorted(_ESTIMATORS)}, got {self.estimator!r}.")


@dataclasses.dataclass
class Pass:
    """What one pass over the data gathered: per targeted layer its pools (per domain), the batches seen,
    and the layers the data reached (by id)."""

    pools: list[Pools]
    seen: int
    reached: set[int]


@contextlib.contextmanager
def _standing_in(model: nn.Module, targets: list[tuple[str, Any]]) -> Iterator[list[tuple[str, Any]]]:
    """``targets`` with a stand-in for each FrozenBatchNorm2d (:func:`bnctl.ecosystem.swap_in`) for the block;
    the stand-ins' values are written back into the originals, which go back in place, on exit."""
    swaps: list[Swap] = []
    try:
        for name, layer in targets:
            if is_frozen_batchnorm(layer):
                swaps.append(swap_in(model, name, layer))
        stand_ins = {swap.name: swap.stand_in for swap in swaps}
        yield [(n, stand_ins.get(n, m)) for n, m in targets]
    finally:
        for swap in reversed(swaps):
            swap_out(swap)


def _gather(model: nn.Module, data: Iterable[Any], targets: list[tuple[str, Any]], options: Options) -> Pass:
    """The pass: ``targets`` normalize with batch statistics and pool them (nothing written), every other
    BatchNorm layer keeps its mode and writes nothing; everything is restored after, also on error."""
    chosen = {id(layer) for _, layer in targets}
    others = [(n, m) for n, m in batchnorm_layers(model) if id(m) not in chosen]
    reached: set[int] = set()
    hooks = [layer.register_forward_pre_hook(lambda m, _i: reached.add(id(m))) for _, layer in targets]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(unchanged(others))
            stack.enter_context(using_layers(targets, PASS))
            states = stack.enter_context(pooling(targets, _ESTIMATORS[options.estimator], explicit=True))
            if options.domain is not None:
                stack.enter_context(domain_scope(model, options.domain))
            stack.enter_context(torch.no_grad())
            seen = _run(model, data, options)
            return Pass([state.pools for state in states], seen, reached)  # type: ignore[misc]
    finally:
        for hook in hooks:
            hook.remove()


def _merge(pass_: Pass, targets: list[tuple[str, Any]], options: Options) -> Pass:
    """The pass's pools merged over ranks (with ``sync`` and a process group), then checked: the data held
    the batches asked for, and every targeted layer saw values (else raise, or with ``strict=False`` warn)."""
    if options.sync and active():
        pass_ = _across_ranks(targets, pass_, options.process_group)
    _check_data(pass_, targets, options)
    return pass_


def _targets(model: nn.Module, options: Options) -> list[tuple[str, Any]]:
    """The layers to recalibrate (checked; a FrozenBatchNorm2d that is the model itself raises)."""
    layers, exclude, domain = options.layers, options.exclude, options.domain
    selected = batchnorm_layers(model, layers, exclude)
    for name, layer in selected:
        check_materialized(display_name(name, layer), layer)
        if is_frozen_batchnorm(layer) and not name:
            swap_in(model, name, layer)  # raises: no parent to put a stand-in in

    def tracked(m: nn.Module) -> bool:
        return is_frozen_batchnorm(m) or bool(m.track_running_stats)

    untracked = [display_name(n, m) for n, m in selected if m.running_mean is not None and not tracked(m)]
    if untracked:
        warnings.warn(
            f"skipped BatchNorm layers whose track_running_stats is False: {untracked}. Set it to True "
            "to recalibrate them.",
            stacklevel=3,
        )
    targets = [(n, m) for n, m in selected if m.running_mean is not None and tracked(m)]
    if domain is not None:
        layers_with(model, domain)  # raises for a domain the model does not have, naming the known ones
        targets = [(n, m) for n, m in targets if domain in domains(m)]
    if not targets:
        raise ValueError(
            f"expected at least one BatchNorm layer with running statistics to recalibrate"
            f"{'' if domain is None else f' in domain {domain!r}'}, got none (layers={layers!r}, "
            f"exclude={exclude!r})."
        )
    return targets


def _run(model: nn.Module, data: Iterable[Any], options: Options) -> int:
    """One forward per batch (at most ``num_batches``); the number of batches."""
    num_batches, call = options.num_batches, options.forward
    bar = progress_bar(num_batches, "recalibrate", options.progress, data)
    seen = 0
    try:
        for batch in bar if bar is not None else data:
            if num_batches is not None and seen >= num_batches:
                break
            call(model, batch)
            seen += 1
    finally:
        if bar is not None:
            bar.close()
    return seen


def _across_ranks(targets: list[tuple[str, Any]], pass_: Pass, group: Any) -> Pass:
    """Every rank's batches and pools merged: the total batch count, the layers any rank reached, and
    each layer's pools (per domain) replaced by the merge of all ranks' (on every rank)."""
    pools, device = pass_.pools, targets[0][1].running_mean.device
    flags = torch.tensor([pass_.seen] + [id(m) in pass_.reached for _, m in targets], dtype=torch.float64,
                         device=device)
    torch.distributed.all_reduce(flags, group=group)
    for (_, layer), pool in zip(targets, pools):
        for name in domains(layer):  # the same on every rank, so every rank makes the same collectives
            local = pool.by_domain.get(name) or pool.kind.empty(layer.num_features, device)
            pool.by_domain[name] = local.across(group)
    return Pass(pools, int(flags[0]), {id(m) for (_, m), flag in zip(targets, flags[1:].tolist()) if flag})


def _check_data(pass_: Pass, targets: list[tuple[str, Any]], options: Options) -> None:
    seen, reached, pools, num_batches = pass_.seen, pass_.reached, pass_.pools, options.num_batches
    if num_batches is not None and seen < num_batches:
        raise ValueError(
            f"expected {num_batches} batches, got {seen}. Pass num_batches=None to use "
            "all the data, or give more data."
        )
    if seen == 0:
        message = "expected at least one batch, got an empty data iterable. Check the DataLoader (or its sampler)"
    else:
        unreached = [display_name(n, m) for n, m in targets if id(m) not in reached]
        empty = [display_name(n, m) for (n, m), pool in zip(targets, pools)
                 if id(m) in reached and not any(float(p.count) > 0 for p in pool.by_domain.values())]
        if not unreached and not empty:
            return
        message = "; ".join(
            [f"BatchNorm layers never reached by the data: {unreached}. Check that the forward passes "
             "through them, or exclude them with exclude=..."] * bool(unreached)
            + [f"BatchNorm layers that saw only empty batches: {empty}"] * bool(empty)
        )
    message += ". Their statistics were left unchanged."
    if options.strict:
        raise ValueError(message + " (strict=False warns instead.)")
    warn_in_user_code(message, UserWarning)


def _write(layer: nn.Module, pools: Pools) -> bool:
    """Write the population statistics of each pooled domain; whether anything was written."""
    written = False
    for domain, pool in pools.by_domain.items():
        if float(pool.count) == 0:
            continue
        t = LayerTensors.of(layer, domain)
        if t.running_mean is None or t.running_var is None:  # (targets have running statistics)
            continue
        assign_running_(t.running_mean, t.running_var, t.num_batches_tracked, *pool.population(), int(pool.batches))
        written = True
    return written
