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
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .apply import Selector, batchnorm_layers, using_layers
from .distributed import active
from .domains import domain as domain_scope
from .domains import layers_with
from .frozen import Swap, is_frozen_batchnorm, swap_in, swap_out
from .guard import assign_running_
from .modules import check_materialized, display_name
from .policy import PRESETS
from .state import LayerTensors, Pools, domains
from .stats import Accumulator, BatchAverage
from .updates import pooling, unchanged

__all__ = ["recalibrate", "call_model", "progress_bar"]

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
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"expected num_batches >= 1 or None, got {num_batches}.")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"expected estimator one of {sorted(_ESTIMATORS)}, got {estimator!r}.")
    targets = _targets(model, layers, exclude, domain)
    chosen = {id(layer) for _, layer in targets}
    others = [(n, m) for n, m in batchnorm_layers(model) if id(m) not in chosen]
    swaps: list[Swap] = []  # FrozenBatchNorm2d layers get stand-ins, written back at the end
    reached: set[int] = set()
    hooks: list[Any] = []
    try:
        for name, layer in targets:
            if is_frozen_batchnorm(layer):
                swaps.append(swap_in(model, name, layer))
        stand_ins = {swap.name: swap.stand_in for swap in swaps}
        targets = [(n, stand_ins.get(n, m)) for n, m in targets]
        hooks = [layer.register_forward_pre_hook(lambda m, _i: reached.add(id(m))) for _, layer in targets]
        with contextlib.ExitStack() as stack:
            stack.enter_context(unchanged(others))
            stack.enter_context(using_layers(targets, PASS))
            states = stack.enter_context(pooling(targets, _ESTIMATORS[estimator], explicit=True))
            if domain is not None:
                stack.enter_context(domain_scope(model, domain))
            stack.enter_context(torch.no_grad())
            seen = _run(model, data, num_batches, forward or call_model, progress)
            pools = [state.pools for state in states]
        if sync and active():
            seen, reached = _across_ranks(targets, pools, seen, reached, process_group)
        _check_data(seen, num_batches, targets, reached, pools, strict)
        with torch.no_grad():
            done = [display_name(name, layer) for (name, layer), pool in zip(targets, pools)
                    if _write(layer, pool)]
    finally:
        for hook in hooks:
            hook.remove()
        for swap in reversed(swaps):
            swap_out(swap)
    logger.info("recalibrated %d BatchNorm layers over %d batches", len(done), seen)
    return done


def _targets(model: nn.Module, layers: Selector, exclude: Selector, domain: str | None) -> list[tuple[str, Any]]:
    selected = batchnorm_layers(model, layers, exclude)
    for name, layer in selected:
        check_materialized(display_name(name, layer), layer)
        if is_frozen_batchnorm(layer) and not name:
            swap_in(model, name, layer)  # raises: no parent to put a stand-in in

    def tracked(m: nn.Module) -> bool:
        return is_frozen_batchnorm(m) or m.track_running_stats

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


def _run(model: nn.Module, data: Iterable[Any], num_batches: int | None,
         call: Callable[[nn.Module, Any], Any], progress: bool | None) -> int:
    bar = progress_bar(num_batches, "recalibrate", progress, data)
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


def _across_ranks(targets: list[tuple[str, Any]], pools: list[Pools], seen: int, reached: set[int],
                  group: Any) -> tuple[int, set[int]]:
    """Every rank's batches and pools merged: the total batch count, the layers any rank reached, and
    each layer's pools (per domain) replaced by the merge of all ranks' (on every rank)."""
    device = targets[0][1].running_mean.device
    flags = torch.tensor([seen] + [id(m) in reached for _, m in targets], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(flags, group=group)
    for (_, layer), pool in zip(targets, pools):
        for name in domains(layer):  # the same on every rank, so every rank makes the same collectives
            local = pool.by_domain.get(name) or pool.kind.empty(layer.num_features, device)
            pool.by_domain[name] = local.across(group)
    return int(flags[0]), {id(m) for (_, m), flag in zip(targets, flags[1:].tolist()) if flag}


def _check_data(seen: int, num_batches: int | None, targets: list[tuple[str, Any]], reached: set[int],
                pools: list[Pools], strict: bool) -> None:
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
    if strict:
        raise ValueError(message + " (strict=False warns instead.)")
    warnings.warn(message, stacklevel=3)


def _write(layer: nn.Module, pools: Pools) -> bool:
    """Write the population statistics of each pooled domain; whether anything was written."""
    written = False
    for domain, pool in pools.by_domain.items():
        if float(pool.count) == 0:
            continue
        t = LayerTensors.of(layer, domain)
        assign_running_(t.running_mean, t.running_var, t.num_batches_tracked, *pool.population(), int(pool.batches))
        written = True
    return written
