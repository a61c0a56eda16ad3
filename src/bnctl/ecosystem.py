"""Other libraries' BatchNorm layers: what bnctl needs to know of each, in one place.

bnctl imports none of these libraries; it recognizes their classes by name and
layout:

* **Buffers-only BatchNorm** (``torchvision.ops.FrozenBatchNorm2d``, timm's
  ``FrozenBatchNorm2d``/``FrozenBatchNormAct2d``, detectron2's): statistics
  and affine values in buffers, no training behaviour, so nothing a policy
  could switch. Where a policy or a recalibration needs one, an equivalent
  ``bnctl.BatchNorm2d`` (a :class:`~bnctl.modules.BatchNormAct2d`, keeping
  ``drop`` and ``act``, for timm's act variant) stands in for it in the
  parent module (:func:`swap_in`); undoing it writes the stand-in's values
  back into the original and puts the original back (:func:`swap_out`).
* **Subclasses whose forward does more than BatchNorm**: timm's
  ``BatchNormAct2d`` (dropout and activation after normalizing) and
  ``SplitBatchNorm2d`` (auxiliary layers per batch split) are known by name;
  others are taught with :func:`register_subclass`. :func:`forward_for` gives
  the forward a controlled layer of such a class runs.

Adding a library means adding its recognition here (and tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import BatchNorm2d, BatchNormAct2d, _PolicyForward, forget_class, forward_of
from .state import LayerState

__all__ = [
    "FROZEN_CLASS_NAMES",
    "Swap",
    "drop_act",
    "forward_for",
    "is_frozen_batchnorm",
    "is_timm_class",
    "normalizes_only",
    "register_subclass",
    "stand_in",
    "swap_in",
    "swap_out",
    "unregister_subclass",
]


# -- buffers-only BatchNorm ------------------------------------------------------------------

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
    buffers = cast("dict[str, Tensor]", frozen._buffers)  # (tensors: is_frozen_batchnorm)
    mean = buffers["running_mean"]
    num_features, device, dtype = mean.numel(), mean.device, mean.dtype
    if hasattr(frozen, "act") or hasattr(frozen, "drop"):
        new: BatchNorm2d = BatchNormAct2d(num_features, eps=frozen.eps, drop=getattr(frozen, "drop", None),
                                          act=getattr(frozen, "act", None), device=device, dtype=dtype)
    else:
        new = BatchNorm2d(num_features, eps=frozen.eps, device=device, dtype=dtype)
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
    forward: Any = old.__dict__.get("forward")
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
    current = cast(Tensor, swap.stand_in.running_mean)  # (a stand-in tracks running statistics)
    buffers = cast("dict[str, Tensor]", swap.original._buffers)  # (tensors: is_frozen_batchnorm)
    original = buffers["running_mean"]
    if original.device != current.device:
        swap.original.to(current.device)
    if original.dtype != current.dtype:
        swap.original.to(current.dtype)
    with torch.no_grad():
        for key in _BUFFERS:
            target = buffers[key]
            target.copy_(getattr(swap.stand_in, key).detach().reshape(target.shape))
    for parent, attr in swap.places:
        parent._modules[attr] = swap.original
    _move_fold(swap.stand_in, swap.original)


# -- subclasses whose forward does more than BatchNorm ----------------------------------------

_ADAPTERS: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {}


def register_subclass(cls: type, after: Callable[[nn.Module, Tensor], Tensor]) -> None:
    """Teach bnctl a BatchNorm subclass whose ``forward`` does more than BatchNorm.

    Some libraries compute BatchNorm inside an overridden ``forward`` and then
    add work (timm's ``BatchNormAct2d`` applies dropout and an activation).
    bnctl cannot change the statistics such a forward uses, so :func:`bnctl.apply`
    refuses these classes unless registered here: bnctl then runs its own
    normalization followed by ``after(layer, y)``, which must do whatever the
    original forward did after normalizing. :func:`unregister_subclass` undoes it.

    Example:
        >>> class BatchNormReLU(torch.nn.BatchNorm2d):
        ...     def forward(self, x):
        ...         return torch.relu(torch.nn.functional.batch_norm(
        ...             x, self.running_mean, self.running_var, self.weight, self.bias,
        ...             self.training, self.momentum, self.eps))
        >>> register_subclass(BatchNormReLU, lambda layer, y: torch.relu(y))
        >>> unregister_subclass(BatchNormReLU)
    """
    if not (isinstance(cls, type) and issubclass(cls, _BatchNorm)):
        raise TypeError(f"expected a BatchNorm subclass, got {cls!r}.")
    if not callable(after):
        raise TypeError(f"expected a callable after(layer, y), got {after!r}.")
    _ADAPTERS[cls] = after
    forget_class(cls)


def unregister_subclass(cls: type) -> None:
    """Forget a :func:`register_subclass` registration (layers already controlled keep theirs).

    Raises:
        KeyError: if ``cls`` is not registered.
    """
    if cls not in _ADAPTERS:
        raise KeyError(f"expected a class registered with bnctl.register_subclass, got {cls!r}.")
    del _ADAPTERS[cls]
    forget_class(cls)


def drop_act(layer: nn.Module, y: Tensor) -> Tensor:
    """What timm's norm+act layers do after normalizing: dropout, then the activation."""
    if hasattr(layer, "drop"):
        y = layer.drop(y)  # type: ignore[operator]  # (a module: Module.__getattr__ says "or a Tensor")
    if hasattr(layer, "act"):
        y = layer.act(y)  # type: ignore[operator]  # (likewise)
    return y


def _split_forward(self: _PolicyForward, input: Tensor) -> Tensor:
    """timm's ``SplitBatchNorm2d`` under a policy.

    In ``train()`` timm normalizes each split of the batch with its own layer
    (the first with this one, the others with ``aux_bn``, which follow the
    same policy). That is kept when the policy treats ``train()`` and
    ``eval()`` differently. A policy that does the same in both (``frozen``,
    ``frozen_stats``, ``test_time``) runs the whole batch through this layer,
    as ``eval()`` does, so ``train()`` and ``eval()`` agree.
    """
    plan = self._bnctl.plan(self)
    if self.training and plan.train != plan.eval:
        return self._bnctl.origin.forward(self, input)
    return drop_act(self, forward_of(self, input))


def is_timm_class(cls: type, name: str) -> bool:
    """Whether ``cls`` is timm's class ``name`` (by package and name: bnctl never imports timm)."""
    return cls.__module__.split(".")[0] == "timm" and cls.__name__ == name


def normalizes_only(layer: nn.Module) -> bool:
    """Whether ``layer``'s forward is BatchNorm's normalization and nothing else, but for timm's
    dropout and activation after it (:func:`drop_act`): torch's classes, bnctl's, and timm's
    ``BatchNormAct2d``; not ``SplitBatchNorm2d`` nor a subclass with a ``forward`` of its own."""
    if not isinstance(layer, _BatchNorm):
        return False
    state: LayerState | None = layer.__dict__.get("_bnctl")
    cls = type(layer) if state is None else state.origin
    plain = (_BatchNorm.forward, nn.SyncBatchNorm.forward, forward_of, BatchNormAct2d.forward)  # (bnctl's own)
    return is_timm_class(cls, "BatchNormAct2d") or cls.forward in plain


def forward_for(cls: type) -> Callable[[_PolicyForward, Tensor], Tensor] | None:
    """The forward a controlled layer of class ``cls`` runs, where its own would hide what bnctl normalizes
    with: a registered class's (:func:`register_subclass`), or one this module knows (timm's
    ``BatchNormAct2d``: normalization, drop, act; ``SplitBatchNorm2d``); ``None`` for any other class."""
    for klass in cls.__mro__:
        after = _ADAPTERS.get(klass)
        if after is not None:
            return lambda self, input: after(self, forward_of(self, input))
        if is_timm_class(klass, "BatchNormAct2d"):
            return lambda self, input: drop_act(self, forward_of(self, input))
        if is_timm_class(klass, "SplitBatchNorm2d"):
            return _split_forward
    return None
