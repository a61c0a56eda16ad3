"""Drop-in BatchNorm layers that follow a :class:`bnctl.Policy`.

``bnctl.BatchNorm1d/2d/3d`` subclass the torch classes: same constructor
(plus ``policy=``), same parameters, buffers and state-dict keys. With the
default ``"torch"`` policy they are bit-identical to PyTorch.

:func:`bnctl.apply` gives an existing layer the same behaviour by switching
its class to a subclass made here (:func:`policy_class`), so the layer keeps
its identity, Parameters, buffers, hooks and ``isinstance`` checks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import Accumulator, Status, batch_norm_with_status, renorm_limits
from .policy import TORCH, Policy, get_policy, resolve_mode

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerState",
    "policy_class",
    "register_subclass",
]


@dataclass
class LayerState:
    """What bnctl keeps on a layer (as ``layer._bnctl``); none of it is in the state dict.

    ``origin`` is the class the layer had before bnctl touched it, and
    ``requires_grad`` its parameters' flags then; :func:`bnctl.revert`
    restores both. ``counts`` is shared by every state the layer has had, so
    the record of skipped updates survives policy changes.
    """

    policy: Policy
    name: str
    origin: type
    requires_grad: tuple[bool, bool] | None = None
    accumulator: Accumulator | None = None
    counts: UpdateCounts = field(default_factory=lambda: UpdateCounts())
    pool: Pool | None = None


@dataclass
class UpdateCounts:
    """Attempted and applied running updates; the difference were skipped (non-finite).

    ``applied`` is an int on the CPU and a tensor on the layer's device
    elsewhere, so counting never waits for the device.
    """

    attempts: int = 0
    applied: int | Tensor = 0

    @property
    def skipped(self) -> int:
        return self.attempts - int(self.applied)


@dataclass
class Pool:
    """Statistics pooled over several forwards by :func:`bnctl.accumulate`, not yet committed."""

    accumulator: Accumulator | None = None
    update: str | None = None


class _PolicyForward(_BatchNorm):
    """Mixin placed just above ``_BatchNorm`` in a layer's MRO; holds the one policy forward."""

    _bnctl: LayerState

    def forward(self, input: Tensor) -> Tensor:
        state = self._bnctl
        self._check_input(input, state.name)
        running_mean, running_var, num_batches_tracked, weight, bias = domain_tensors(
            self, self.__dict__.get("_bnctl_domain")
        )
        mode = resolve_mode(
            state.policy, self.training, self.track_running_stats, running_mean is not None
        )
        momentum = effective_momentum(self)
        if mode.update == "cumulative" and state.accumulator is None:
            state.accumulator = Accumulator.empty(self.num_features, input.device)
        limits: tuple[Any, Any] = (state.policy.rmax, state.policy.dmax)
        if mode.normalize == "renorm":
            limits = renorm_limits(
                state.policy.rmax,
                state.policy.dmax,
                state.policy.renorm_warmup,
                num_batches_tracked,
            )
        defer = None
        if state.pool is not None and mode.update != "none":
            if state.pool.accumulator is None:
                state.pool.accumulator = Accumulator.empty(self.num_features, input.device)
            state.pool.update = mode.update
            defer = state.pool.accumulator
        out, ok = batch_norm_with_status(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            mode=mode,
            momentum=momentum,
            eps=self.eps,
            num_batches_tracked=num_batches_tracked,
            accumulator=state.accumulator,
            renorm=limits,
            fallback=state.policy.fallback,
            defer=defer,
            layer=state.name,
        )
        if ok is not None:
            count_skip(state, ok)
        return out

    def _check_input(self, input: Tensor, name: str) -> None:
        try:
            self._check_input_dim(input)
        except ValueError as err:
            raise ValueError(
                f"{name}: {err}. {type(self).__name__} takes input of shape "
                f"{_expected_shape(self)}; reshape the input or use the BatchNorm of matching "
                "dimensionality."
            ) from err
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected {self.num_features} channels in dim 1, got input of shape "
                f"{tuple(input.shape)}. Check the preceding layer's output channels (or pass "
                "channels-first data: (N, C, ...))."
            )

    @property
    def policy(self) -> Policy:
        """This layer's :class:`bnctl.Policy` (change it with :func:`bnctl.apply`)."""
        return self._bnctl.policy

    @property
    def skipped_updates(self) -> int:
        """Running updates skipped because the batch statistics were non-finite."""
        return self._bnctl.counts.skipped

    def extra_repr(self) -> str:
        policy = self._bnctl.policy
        label = policy.name or "custom"
        return f"{super().extra_repr()}, policy={label}"


def _expected_shape(layer: _BatchNorm) -> str:
    shapes = {
        nn.BatchNorm1d: "(N, C) or (N, C, L)",
        nn.BatchNorm2d: "(N, C, H, W)",
        nn.BatchNorm3d: "(N, C, D, H, W)",
    }
    for cls, shape in shapes.items():
        if isinstance(layer, cls):
            return shape
    return "(N, C, ...)"


def layer_policy(layer: _BatchNorm) -> Policy:
    """The policy a layer follows: its bnctl policy, or ``torch`` for a plain layer."""
    state = layer.__dict__.get("_bnctl")
    return TORCH if state is None else state.policy


def effective_momentum(layer: _BatchNorm) -> float | None:
    """The momentum a layer's updates use: the policy's override, else the layer's own."""
    policy = layer_policy(layer)
    return layer.momentum if policy.momentum is None else policy.momentum


def count_skip(state: LayerState, ok: Status) -> None:
    """Record the outcome of an attempted running update (warn on the CPU when skipped)."""
    counts = state.counts
    counts.attempts += 1
    if isinstance(ok, bool):  # on the CPU: count and warn at once
        counts.applied += int(ok)
        if not ok:
            warnings.warn(
                f"{state.name}: skipped the running-statistics update of this batch "
                "(non-finite or undefined batch statistics, or non-finite running statistics); "
                "running_mean, running_var and num_batches_tracked are unchanged "
                f"({counts.skipped} skipped so far). Check the input and the "
                "preceding layers for overflow, and the buffers with bnctl.report(model).",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    # Elsewhere reading the flag would make every forward wait for the device: count on the
    # device; report() and skipped_updates read the count.
    if isinstance(counts.applied, int):
        counts.applied = torch.full((), counts.applied, dtype=torch.long, device=ok.device)
    counts.applied.add_(ok)


# -- domains (see domains.py): which tensors a forward uses -------------------------------

DEFAULT = "default"
"""The name of the canonical statistics (``running_mean``, ...)."""

_STATS = ("running_mean", "running_var", "num_batches_tracked")
_AFFINE = ("weight", "bias")


def _key(base: str, name: str) -> str:
    return f"{base}__{name}"


def domains(layer: nn.Module) -> list[str]:
    """The domains of a layer, ``"default"`` first (derived from its buffers)."""
    suffix = "running_mean__"
    return [DEFAULT] + [k[len(suffix):] for k in layer._buffers if k.startswith(suffix)]


def domain_tensors(layer: _BatchNorm, name: str | None) -> tuple[Any, ...]:
    """``(running_mean, running_var, num_batches_tracked, weight, bias)`` of a domain."""
    if name is None or name == DEFAULT:
        return (layer.running_mean, layer.running_var, layer.num_batches_tracked,
                layer.weight, layer.bias)
    stats = tuple(layer._buffers[_key(k, name)] for k in _STATS)
    affine = tuple(layer._parameters.get(_key(k, name), getattr(layer, k)) for k in _AFFINE)
    return stats + affine



# -- classes for existing layers ---------------------------------------------------------

_ADAPTERS: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {}
_CLASSES: dict[type, type] = {}


def register_subclass(cls: type, after: Callable[[nn.Module, Tensor], Tensor]) -> None:
    """Teach bnctl a BatchNorm subclass whose ``forward`` does more than BatchNorm.

    Some libraries compute BatchNorm inside an overridden ``forward`` and then
    add work (timm's ``BatchNormAct2d`` applies dropout and an activation).
    bnctl cannot change the statistics such a forward uses, so :func:`bnctl.apply`
    refuses these classes unless registered here: bnctl then runs its own
    normalization followed by ``after(layer, y)``, which must do whatever the
    original forward did after normalizing.

    Example:
        >>> class BatchNormReLU(torch.nn.BatchNorm2d):
        ...     def forward(self, x):
        ...         return torch.relu(torch.nn.functional.batch_norm(
        ...             x, self.running_mean, self.running_var, self.weight, self.bias,
        ...             self.training, self.momentum, self.eps))
        >>> register_subclass(BatchNormReLU, lambda layer, y: torch.relu(y))
    """
    if not (isinstance(cls, type) and issubclass(cls, _BatchNorm)):
        raise TypeError(f"expected a BatchNorm subclass, got {cls!r}.")
    if not callable(after):
        raise TypeError(f"expected a callable after(layer, y), got {after!r}.")
    _ADAPTERS[cls] = after
    _CLASSES.pop(cls, None)


def _calls_super_forward(fn: Any) -> bool:
    code = getattr(fn, "__code__", None)
    return code is not None and "super" in code.co_names and "forward" in code.co_names


def _forward_overrides(cls: type) -> list[type]:
    """Classes between ``cls`` and torch's own BatchNorm classes that define ``forward``."""
    found = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is _PolicyForward:
            break
        if "forward" in vars(klass):
            found.append(klass)
    return found


def policy_class(cls: type, name: str = "layer") -> type:
    """The class an existing layer of class ``cls`` takes under a bnctl policy.

    A subclass of ``cls`` whose BatchNorm computation follows the layer's
    policy. Subclasses whose own ``forward`` calls ``super().forward`` keep
    their extra behaviour (bnctl sits below them in the MRO); registered ones
    (:func:`register_subclass`) run their ``after`` step.

    Raises:
        TypeError: for a subclass that overrides ``forward`` without calling
            ``super().forward`` and is not registered.
    """
    if issubclass(cls, _PolicyForward):
        return cls
    if cls in _CLASSES:
        return _CLASSES[cls]
    attrs: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    adapter = next((_ADAPTERS[k] for k in cls.__mro__ if k in _ADAPTERS), None)
    overrides = _forward_overrides(cls)
    if adapter is not None:

        def forward(self: nn.Module, input: Tensor) -> Tensor:
            return adapter(self, _PolicyForward.forward(self, input))

        attrs["forward"] = forward
    elif issubclass(cls, nn.SyncBatchNorm):
        if overrides:
            raise _refusal(cls, name)
        attrs["forward"] = _sync_forward
    elif not all(_calls_super_forward(vars(k)["forward"]) for k in overrides):
        raise _refusal(cls, name)
    new = type(cls.__name__, (cls, _PolicyForward), attrs)
    _CLASSES[cls] = new
    return new


def _refusal(cls: type, name: str) -> TypeError:
    return TypeError(
        f"{name}: {cls.__module__}.{cls.__qualname__} overrides forward() without calling "
        "super().forward(), so bnctl cannot choose its statistics without dropping what that "
        "forward adds. Fixes: call super().forward(x) inside it, or register the extra steps "
        "with bnctl.register_subclass(cls, after=lambda layer, y: ...), or leave the layer out "
        "with exclude=..."
    )


def _sync_forward(self: nn.Module, input: Tensor) -> Tensor:
    mode = resolve_mode(
        self._bnctl.policy, self.training, self.track_running_stats, self.running_mean is not None
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and mode.normalize != "running" and self.training:
        raise RuntimeError(
            f"{self._bnctl.name}: bnctl policies do not synchronize batch statistics across "
            "processes yet, and a process group is initialized. Use bnctl.revert(model) to get "
            "torch's SyncBatchNorm back, or a policy that normalizes with running statistics."
        )
    return _PolicyForward.forward(self, input)


def set_policy(layer: _BatchNorm, policy: str | Policy, name: str) -> LayerState:
    """Give ``layer`` a policy in place (class switch, state, affine flags); returns the state."""
    policy = get_policy(policy)
    previous: LayerState | None = getattr(layer, "_bnctl", None)
    cls = policy_class(type(layer), name)
    if previous is None:
        grads = None
        if layer.weight is not None and layer.bias is not None:
            grads = (layer.weight.requires_grad, layer.bias.requires_grad)
        state = LayerState(policy, name, type(layer), grads)
    else:
        state = LayerState(
            policy,
            name,
            previous.origin,
            previous.requires_grad,
            None,  # a new policy starts a fresh cumulative average
            previous.counts,
        )
    layer.__class__ = cls
    layer._bnctl = state
    set_learn_affine(layer, policy.learn_affine)
    return state


def set_learn_affine(layer: _BatchNorm, learn: bool | None) -> None:
    """Set ``requires_grad`` of weight and bias; freezing also drops stale ``.grad``."""
    if learn is None:
        return
    for param in layer.parameters(recurse=False):  # per-domain affine included
        param.requires_grad_(learn)
        if not learn:
            param.grad = None


# -- drop-in layers ----------------------------------------------------------------------


class _Constructor:
    """The torch constructor plus ``policy=``; shared by the three public classes."""

    def __init__(self, *args: Any, policy: str | Policy = "torch", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        base = next(k for k in type(self).__mro__ if k.__module__.startswith("torch."))
        self._bnctl = LayerState(TORCH, type(self).__name__, base)
        set_policy(self, policy, type(self).__name__)  # type: ignore[arg-type]


class BatchNorm1d(_Constructor, nn.BatchNorm1d, _PolicyForward):
    """:class:`torch.nn.BatchNorm1d` that follows a :class:`bnctl.Policy`.

    Same arguments as the torch class, plus ``policy`` (a preset name or a
    Policy; default ``"torch"``, bit-identical to the torch class).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``; Output: same as input.

    Example:
        >>> bn = BatchNorm1d(3, policy="frozen_stats").train()
        >>> _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked), bn.weight.requires_grad
        (0, True)
    """


class BatchNorm2d(_Constructor, nn.BatchNorm2d, _PolicyForward):
    """:class:`torch.nn.BatchNorm2d` that follows a :class:`bnctl.Policy`.

    Same arguments as the torch class, plus ``policy`` (a preset name or a
    Policy; default ``"torch"``, bit-identical to the torch class).

    Shape:
        - Input: ``(N, C, H, W)``; Output: same as input (memory format kept).

    Example:
        >>> bn = BatchNorm2d(3, policy="running_update").train()
        >>> x = torch.randn(8, 3, 4, 4) + 5
        >>> y = bn(x)  # normalized with the old running statistics (0 and 1)...
        >>> torch.allclose(y, x / (1 + bn.eps) ** 0.5)
        True
        >>> bool((bn.running_mean > 0.4).all())  # ...which were then updated
        True
    """


class BatchNorm3d(_Constructor, nn.BatchNorm3d, _PolicyForward):
    """:class:`torch.nn.BatchNorm3d` that follows a :class:`bnctl.Policy`.

    Same arguments as the torch class, plus ``policy`` (a preset name or a
    Policy; default ``"torch"``, bit-identical to the torch class).

    Shape:
        - Input: ``(N, C, D, H, W)``; Output: same as input.
    """
