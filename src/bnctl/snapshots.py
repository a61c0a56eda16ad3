"""Snapshots of running statistics: :func:`snapshot` copies every BatchNorm layer's statistics by
qualified name, :func:`restore` writes them back."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .apply import batchnorm_layers
from .ecosystem import is_frozen_batchnorm
from .modules import check_materialized, display_name

__all__ = ["restore", "snapshot"]

Snapshot = dict[str, dict[str, Tensor]]


def snapshot(model: nn.Module) -> Snapshot:
    """Copies of every BatchNorm layer's buffers (all domains), by qualified name.

    Raises:
        ValueError: an uninitialized lazy layer (it has no values yet).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
        >>> saved = snapshot(model)
        >>> _ = model.train()(torch.randn(4, 3))
        >>> restore(model, saved)
        >>> int(model[0].num_batches_tracked)
        0
    """
    layers = batchnorm_layers(model)
    for name, layer in layers:
        check_materialized(display_name(name, layer), layer)
    return {
        name: {k: b.detach().clone() for k, b in layer.named_buffers(recurse=False)}
        for name, layer in layers
    }


def restore(model: nn.Module, saved: Snapshot) -> None:
    """Write a :func:`snapshot` back, matching layers and buffers by name.

    Snapshots carry across a ``FrozenBatchNorm2d``'s stand-in swap (:func:`bnctl.apply` puts a
    ``bnctl.BatchNorm2d`` in its place, ``remove()`` puts it back): the frozen layer's ``weight`` and
    ``bias`` buffers are the stand-in's ``weight`` and ``bias``, and the stand-in's
    ``num_batches_tracked`` has no place in the frozen layer (it is left out).

    Raises:
        ValueError: the snapshot names a layer or buffer the model lacks, or holds values of another
            shape (checked before anything is written).
    """
    layers = dict(batchnorm_layers(model))
    missing, plan = [], []
    for name, bufs in saved.items():
        own = _restorable(layers[name]) if name in layers else {}
        for k, value in bufs.items():
            if k in own:
                plan.append((name, k, own[k], value))
            elif not (name in layers and is_frozen_batchnorm(layers[name]) and k.startswith("num_batches_tracked")):
                missing.append(f"{name}.{k}" if name else k)
    if missing:
        raise ValueError(
            f"expected the snapshot's BatchNorm buffers in the model, missing: {sorted(missing)}. "
            "Restore into the model the snapshot was taken from (and with the same domains)."
        )
    for name, k, target, value in plan:
        if target.shape != value.shape:
            raise ValueError(
                f"{display_name(name, layers[name])}: the snapshot's {k} has shape {tuple(value.shape)}, the "
                f"layer's {tuple(target.shape)}. Restore into the model the snapshot was taken from."
            )
    with torch.no_grad():
        for _name, _k, target, value in plan:
            target.copy_(value)


def _restorable(layer: nn.Module) -> dict[str, Tensor]:
    """What :func:`restore` may write in ``layer``: its buffers, and its ``weight`` and ``bias`` (which a
    snapshot holds only when taken of a buffers-only ``FrozenBatchNorm2d``)."""
    own = dict(layer.named_buffers(recurse=False))
    for key in ("weight", "bias"):
        param = layer._parameters.get(key)
        if param is not None:
            own.setdefault(key, param)
    return own


