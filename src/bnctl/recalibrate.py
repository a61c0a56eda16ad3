"""Recompute running statistics over data (AdaBN, precise BN, after SWA/pruning).

Only the targeted BatchNorm layers change behaviour during the pass: they
normalize with batch statistics and merge every batch exactly (count, mean,
M2 in float64). Every other module keeps its mode (dropout stays off in a
model in eval), and everything is restored in ``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .apply import Selector, _apply, batchnorm_layers
from .domains import domain as domain_scope
from .modules import domain_tensors
from .policy import Policy
from .updates import restore, snapshot

__all__ = ["recalibrate"]

logger = logging.getLogger(__name__)

_RECALIBRATE = Policy("batch", "cumulative", "batch", "cumulative", name="recalibrate")
_PER_BATCH = Policy("batch", "ema", "batch", "ema", name="recalibrate")
# learn_affine stays None: a recalibration never touches requires_grad.

def _call(model: nn.Module, batch: Any) -> Any:
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


def _progress(iterable: Iterable[Any], total: int | None, enabled: bool | None) -> Iterable[Any]:
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if enabled:
            warnings.warn(
                "progress=True needs tqdm: pip install 'bnctl[progress]'. Continuing without.",
                stacklevel=3,
            )
        return iterable
    return tqdm(iterable, total=total, desc="recalibrate", leave=False)


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
    whole model in train mode) no other module changes mode, and the
    variance includes the spread between batch means. Runs under
    ``torch.no_grad()``, one forward per batch.

    Everything it changes (policies, classes, flags) is restored in
    ``finally``. If the pass fails or is interrupted (``KeyboardInterrupt``
    included), the running statistics are restored too: the model is left
    exactly as it was.

    Args:
        model: the model.
        data: an iterable of batches: tensors, tuples/lists whose first
            element is the input, or dicts of keyword arguments.
        num_batches: use this many batches (``None``: all of ``data``).
        layers: which BatchNorm layers (``fnmatch`` pattern(s) or a predicate
            ``(name, module) -> bool``); default all that have running
            statistics.
        exclude: BatchNorm layers to leave alone (same forms).
        forward: ``forward(model, batch)`` for batches of any other form.
        strict: raise if a targeted layer never saw data (else warn).
        progress: show a tqdm bar (``None``: when stderr is a terminal and tqdm is installed).
        domain: recalibrate this domain's statistics (see :func:`bnctl.domain`);
            other domains and every parameter stay bit-identical (AdaBN).
        estimator: ``"exact"`` (population statistics, above) or
            ``"per_batch"``: the average of per-batch means and of per-batch
            unbiased variances, what ``torch.optim.swa_utils.update_bn`` and
            pycls compute. It leaves out the spread between batch means, so it
            underestimates the variance when batches differ (small or
            non-i.i.d. batches), and it depends on the batch size.

    Returns:
        The qualified names of the layers that were recalibrated.

    Raises:
        ValueError: ``data`` has fewer than ``num_batches`` batches, no layer
            is selected, or (``strict``) a targeted layer was never reached.

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
    # Layers built with track_running_stats=False have nothing to recalibrate.
    targets = [
        (name, layer)
        for name, layer in batchnorm_layers(model, layers, exclude)
        if layer.running_mean is not None
    ]
    if not targets:
        raise ValueError(
            f"expected at least one BatchNorm layer to recalibrate, got none (layers={layers!r}, "
            f"exclude={exclude!r})."
        )
    if estimator not in ("exact", "per_batch"):
        raise ValueError(f"expected estimator 'exact' or 'per_batch', got {estimator!r}.")
    call = forward or _call
    saved = snapshot(model)
    policy = _RECALIBRATE if estimator == "exact" else _PER_BATCH
    handle = _apply(targets, lambda _layer: policy)
    momenta = [layer.momentum for _, layer in targets]
    reached: set[int] = set()
    hooks = [layer.register_forward_pre_hook(lambda m, _i: reached.add(id(m))) for _, layer in targets]
    seen = 0
    done = False
    try:
        with contextlib.ExitStack() as stack:
            if domain is not None:
                stack.enter_context(domain_scope(model, domain))
            for _, layer in targets:
                # the statistics are recomputed from scratch; num_batches_tracked counts the
                # batches they come from
                _rm, _rv, nbt, _w, _b = domain_tensors(layer, layer.__dict__.get("_bnctl_domain"))
                if nbt is not None:
                    nbt.zero_()
                if estimator == "per_batch":
                    layer.momentum = None  # PyTorch's cumulative average, as update_bn does
            stack.enter_context(torch.no_grad())
            for batch in _progress(data, num_batches, progress):
                if num_batches is not None and seen >= num_batches:
                    break
                call(model, batch)
                seen += 1
        if num_batches is not None and seen < num_batches:
            raise ValueError(
                f"expected {num_batches} batches, got {seen}. Pass num_batches=None to use "
                "all the data, or give more data."
            )
        unreached = [name or type(layer).__name__ for name, layer in targets if id(layer) not in reached]
        if unreached:
            message = (
                f"BatchNorm layers never reached by the data: {unreached}. Check that the "
                "forward passes through them, or exclude them with exclude=..."
            )
            if strict:
                raise ValueError(message + " (strict=False warns instead.)")
            warnings.warn(message, stacklevel=2)
        done = True
        logger.info("recalibrated %d BatchNorm layers over %d batches", len(reached), seen)
        return [name or type(layer).__name__ for name, layer in targets if id(layer) in reached]
    finally:
        for hook in hooks:
            hook.remove()
        for (_, layer), momentum in zip(targets, momenta):
            layer.momentum = momentum
        handle.remove()
        if not done:
            restore(model, saved)
