"""Buffers-only BatchNorm (``FrozenBatchNorm2d``) made controllable by standing in for it.

Detection and segmentation backbones (``torchvision.ops.FrozenBatchNorm2d``,
timm's ``FrozenBatchNorm2d``/``FrozenBatchNormAct2d``, detectron2's) normalize
with statistics and affine values held in buffers: no training behaviour, no
Parameters, so there is nothing a policy could switch. bnctl recognizes them
by duck typing (class name and buffers; none of those libraries is imported)
and, where a policy or a recalibration needs them, puts an equivalent
``bnctl.BatchNorm2d`` (a :class:`~bnctl.modules.BatchNormAct2d`, keeping
``drop`` and ``act``, for timm's act variant) in their place in the parent
module. Undoing it writes the stand-in's current values back into the
original object and puts the original back, so what was learned or
recalibrated is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modules import BatchNorm2d, BatchNormAct2d

__all__ = ["FROZEN_CLASS_NAMES", "Swap", "is_frozen_batchnorm", "stand_in", "swap_in", "swap_out"]

FROZEN_CLASS_NAMES = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")
_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a buffers-only BatchNorm: a class named ``FrozenBatchNorm2d`` (or
    ``FrozenBatchNormAct2d``) with ``eps`` and the buffers ``weight``, ``bias``, ``running_mean``,
    ``running_var``."""
    return (
        type(module).__name__ in FROZEN_CLASS_NAMES
        and hasattr(module, "eps")
        and all(isinstance(module._buffers.get(k), torch.Tensor) for k in _BUFFERS)
    )


def stand_in(frozen: nn.Module) -> BatchNorm2d:
    """A ``bnctl.BatchNorm2d`` that computes what ``frozen`` computes (not yet in the model).

    Same statistics, ``eps``, device and dtype; ``weight`` and ``bias`` become
    Parameters with ``requires_grad=False`` (they were not learned; a policy
    with ``learn_affine=True`` turns learning on). ``num_batches_tracked``
    starts at 0 and ``momentum`` is PyTorch's default, 0.1.
    """
    buffers = frozen._buffers
    num_features = buffers["running_mean"].numel()
    factory = {"device": buffers["running_mean"].device, "dtype": buffers["running_mean"].dtype}
    if hasattr(frozen, "act") or hasattr(frozen, "drop"):
        new: BatchNorm2d = BatchNormAct2d(num_features, eps=frozen.eps, drop=getattr(frozen, "drop", None),
                                          act=getattr(frozen, "act", None), **factory)
    else:
        new = BatchNorm2d(num_features, eps=frozen.eps, **factory)
    with torch.no_grad():
        for key in _BUFFERS:
            getattr(new, key).copy_(buffers[key].reshape(-1))
    new.weight.requires_grad_(False)
    new.bias.requires_grad_(False)
    return new.train(frozen.training)


@dataclass
class Swap:
    """One ``FrozenBatchNorm2d`` replaced by a stand-in at every place it sits (``parent.<attr>``)."""

    name: str
    places: list[tuple[nn.Module, str]]
    original: nn.Module
    stand_in: BatchNorm2d


def swap_in(model: nn.Module, name: str, frozen: nn.Module) -> Swap:
    """Put a :func:`stand_in` for the layer ``name`` of ``model`` in its place (every place, when the
    model holds the same object more than once). Hooks registered on ``frozen`` do not run on its
    stand-in.

    Raises:
        ValueError: ``frozen`` is ``model`` itself (it has no parent to put a stand-in in).
    """
    if not name:
        raise ValueError(
            f"{type(frozen).__name__}: expected a model containing the FrozenBatchNorm2d, got the layer "
            "itself; bnctl replaces such a layer in its parent module. Pass the model (or wrap the layer "
            "in torch.nn.Sequential)."
        )
    places = [(parent, attr) for parent in model.modules() for attr, child in parent._modules.items()
              if child is frozen]
    swap = Swap(name, places, frozen, stand_in(frozen))
    for parent, attr in places:
        parent._modules[attr] = swap.stand_in
    _move_fold(frozen, swap.stand_in)
    return swap


def _move_fold(old: nn.Module, new: nn.Module) -> None:
    """Hand a :func:`bnctl.fold` pairing of ``old`` (an instance-level forward bound to its pair) to
    ``new``, so the conv before it folds with the module that is now in the model."""
    forward = old.__dict__.get("forward")
    pair = getattr(forward, "__self__", None)
    if pair is not None and getattr(pair, "norm", None) is old:
        del old.__dict__["forward"]
        pair.norm = new
        new.forward = forward


def swap_out(swap: Swap) -> None:
    """Write the stand-in's current values into the original and put the original back.

    The original first follows the stand-in to its device and floating-point dtype: a
    ``model.double()``, ``.half()`` or ``.to(device)`` made while the stand-in sat in the model
    reaches the layer it stood in for, as it would have without bnctl.
    """
    current = swap.stand_in.running_mean
    original = swap.original._buffers["running_mean"]
    if original.device != current.device:
        swap.original.to(current.device)
    if original.dtype != current.dtype:
        swap.original.to(current.dtype)
    with torch.no_grad():
        for key in _BUFFERS:
            target = swap.original._buffers[key]
            target.copy_(getattr(swap.stand_in, key).detach().reshape(target.shape))
    for parent, attr in swap.places:
        parent._modules[attr] = swap.original
    _move_fold(swap.stand_in, swap.original)
