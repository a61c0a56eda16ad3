"""BatchNorm layers that follow a :class:`bnctl.Policy`.

``bnctl.BatchNorm1d/2d/3d`` (and ``bnctl.modules.SyncBatchNorm``) subclass
the torch classes: same constructor (plus ``policy=``), same parameters,
buffers and state-dict keys. With the default ``"torch"`` policy they are
bit-identical to PyTorch.

bnctl takes an existing layer under its control (:func:`control`) by switching
its class to one of these, so the layer keeps its identity, Parameters,
buffers, hooks and ``isinstance`` checks, and a model pickles by reference to
importable classes. Third-party subclasses get a subclass made at run time
(:func:`policy_class`, cached), which pickles through its origin class.
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .policy import NO_UPDATE, TORCH, Plan, Policy, get_policy, kinds, make_plan, needs_running_stats
from .state import AFFINE, DEFAULT, STATS, LayerState, domain_key, domains, warn_in_user_code

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNormAct2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "check_controllable",
    "check_materialized",
    "check_policy",
    "control",
    "display_name",
    "grad_flags",
    "is_uninitialized",
    "layer_plan",
    "layer_policy",
    "layer_state",
    "forward_of",
    "policy_class",
    "release",
    "revert_layer",
    "set_grad_flags",
    "set_learn_affine",
]


_DOMAIN_TENSORS = frozenset(STATS + AFFINE)


def _active_key(layer: nn.Module, name: str) -> str | None:
    """Inside ``bnctl.domain(model, d)``: the attribute holding domain ``d``'s tensor ``name`` (one of
    :data:`~bnctl.state.STATS`, :data:`~bnctl.state.AFFINE`), else ``None`` (the canonical one is meant)."""
    state: LayerState | None = layer.__dict__.get("_bnctl")
    if state is None or state.domain == DEFAULT:
        return None
    key = domain_key(name, state.domain)
    found = layer.__dict__.get("_buffers", {}).get(key, layer.__dict__.get("_parameters", {}).get(key))
    return key if found is not None else None


class _PolicyForward(_BatchNorm):
    """Mixin placed just above ``_BatchNorm`` in a layer's MRO; holds the one policy forward.

    Inside ``bnctl.domain(model, d)`` the layer's ``running_mean``, ``running_var``, ``num_batches_tracked``
    (and ``weight``/``bias`` where the domain has its own) read and assign domain ``d``'s tensors, while the
    state dict and ``named_buffers()`` keep naming each tensor by its domain: attribute access is redirected
    (:meth:`__getattr__`, :meth:`__setattr__`), the tensors stay where they are. A forward never reads these
    attributes (it reads the tensors its program names), so the redirection costs it nothing.
    """

    _bnctl: LayerState

    def __getattr__(self, name: str) -> Any:
        if name in _DOMAIN_TENSORS:
            key = _active_key(self, name)
            if key is not None:
                name = key
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _DOMAIN_TENSORS:
            key = _active_key(self, name)
            if key is not None:
                name = key
        super().__setattr__(name, value)

    def forward(self, input: Tensor) -> Tensor:
        try:
            self._check_input_dim(input)
        except ValueError as err:
            raise ValueError(
                f"{self._bnctl.name}: {err}. {type(self).__name__} takes input of shape "
                f"{_expected_shape(self)}; reshape the input or use the BatchNorm of matching "
                "dimensionality."
            ) from err
        if input.ndim < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._bnctl.name}: expected {self.num_features} channels in dim 1, got input of shape "
                f"{tuple(input.shape)}. Check the preceding layer's output channels (or pass "
                "channels-first data: (N, C, ...))."
            )
        return self._bnctl.forward(self, input)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              *args: Any) -> None:
        # A checkpoint without a domain's keys (a plain one) initializes that domain from the
        # canonical values, so strict loading works; as FrozenBatchNorm2d handles its own keys.
        # A checkpoint from before num_batches_tracked existed (version < 2) keeps each domain's
        # counter, as torch keeps the canonical one.
        old = local_metadata.get("version", None) is None or local_metadata["version"] < 2
        for name in domains(self)[1:]:
            for base in STATS + AFFINE:
                attr = domain_key(base, name)
                if prefix + attr in state_dict or not hasattr(self, attr):
                    continue
                if prefix + base in state_dict:
                    state_dict[prefix + attr] = state_dict[prefix + base]
                elif base == "num_batches_tracked" and old and self.track_running_stats:
                    state_dict[prefix + attr] = self._buffers[attr]
        count = self._buffers.get("num_batches_tracked")
        if old and self.track_running_stats and prefix + "num_batches_tracked" not in state_dict:
            # what torch's loader does, read from the canonical buffer (inside a domain block the
            # attribute torch reads is the domain's)
            keep = count is not None and count.device != torch.device("meta")
            state_dict[prefix + "num_batches_tracked"] = count if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def __reduce_ex__(self, protocol: Any) -> Any:
        state = self._bnctl
        if not _kept(self, state):
            # held only by scopes of the original (no_update, accumulate, ...): a copy is plain
            plain = {k: v for k, v in self.__dict__.items() if k != "_bnctl"}
            return (object.__new__, (state.origin,), plain)
        origin = type(self).__dict__.get("_bnctl_origin")
        if origin is None:  # a static class: pickled by reference, as any module
            return super().__reduce_ex__(protocol)
        return (_new_controlled, (origin,), self.__dict__)

    def reset_running_stats(self) -> None:
        """torch's reset, with a warning where the policy would never refill the statistics."""
        super().reset_running_stats()
        state: LayerState | None = self.__dict__.get("_bnctl")
        if state is not None and self.running_mean is not None and kinds(state.plan(self).train)[1] == NO_UPDATE:
            warn_in_user_code(
                f"{state.name}: running statistics reset to 0 and 1, but policy {state.policy.label!r} never "
                "updates them in train(), so no forward will refill them (torch.optim.swa_utils.update_bn "
                "resets them, then relies on train() forwards). Recompute them with bnctl.recalibrate(model, "
                "loader) instead, or remove the policy first.",
                UserWarning,
            )

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` cannot compile a policy forward: say so, naming the way out."""
        raise TypeError(
            f"{self._bnctl.name}: torch.jit.script cannot compile bnctl's policy forward. Use torch.compile "
            "or torch.export (both supported), or bnctl.revert(model) first to script plain BatchNorm."
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
        # torch's own text, with the momentum the layer's updates actually use
        text = super().extra_repr()
        used = self._bnctl.plan(self).train.momentum
        if used != self.momentum:
            text = text.replace(f"momentum={self.momentum}", f"momentum={used}", 1)
        return f"{text}, policy={self._bnctl.policy.label}"


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


class _SyncPolicyForward(nn.SyncBatchNorm, _PolicyForward):
    """The policy forward in place of torch's ``SyncBatchNorm.forward`` (so a subclass's
    ``super().forward()`` reaches bnctl's, which synchronizes over the layer's ``process_group``)."""

    forward = _PolicyForward.forward


forward_of: Callable[[_PolicyForward, Tensor], Tensor] = _PolicyForward.forward
"""bnctl's normalization of a controlled layer: its forward, before anything a subclass adds."""


# -- taking layers under control -----------------------------------------------------------


def display_name(name: str, layer: nn.Module) -> str:
    """A layer's qualified name, or its class name for the root of a model (``""``)."""
    return name or type(layer).__name__


def check_policy(name: str, layer: _BatchNorm, policy: Policy) -> None:
    """Raise, before anything changes, if ``layer`` cannot follow ``policy``."""
    check_controllable(name, layer)
    if layer.running_mean is None and needs_running_stats(policy):
        raise ValueError(
            f"{name}: policy {policy.label!r} needs running statistics, but the "
            "layer has none (built with track_running_stats=False). Exclude it, or use a "
            "policy that normalizes with batch statistics and updates nothing (e.g. "
            "'test_time')."
        )


def check_controllable(name: str, layer: _BatchNorm) -> None:
    """Raise, before anything changes, if bnctl cannot control ``layer``'s forward."""
    check_materialized(name, layer)
    policy_class(type(layer), name)  # raises for subclasses it cannot handle


def is_uninitialized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a lazy layer that has not seen its first input yet."""
    return isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params()


def check_materialized(name: str, layer: nn.Module) -> None:
    """Raise, naming the layer, for an uninitialized lazy layer (it has no values yet)."""
    if is_uninitialized(layer):
        raise ValueError(
            f"{name}: expected a materialized layer, got an uninitialized "
            f"{type(layer).__name__}. Run one forward pass (or call the model on a dummy "
            "batch) first."
        )


def control(layer: _BatchNorm, name: str = "") -> LayerState:
    """Take ``layer`` under bnctl's control (class switch and state), or return its state.

    A layer taken over follows the ``torch`` policy (bit-identical to PyTorch)
    until a policy is applied. ``name`` (a qualified name) labels its errors.
    """
    state: LayerState | None = layer.__dict__.get("_bnctl")
    if state is not None:
        if name:
            state.name = name
        return state
    cls = policy_class(type(layer), display_name(name, layer))
    state = LayerState(display_name(name, layer), type(layer), grad_flags(layer))
    layer.__class__ = cls
    cast(_PolicyForward, layer)._bnctl = state  # (its class is now a policy class)
    return state


def layer_state(layer: nn.Module) -> LayerState | None:
    """The :class:`~bnctl.state.LayerState` of a layer under bnctl's control, else ``None``."""
    return layer.__dict__.get("_bnctl")


def revert_layer(layer: _BatchNorm) -> None:
    """Turn a bnctl layer back into its original class, with its original ``requires_grad`` flags."""
    state: LayerState | None = layer.__dict__.pop("_bnctl", None)
    if state is None:
        return
    layer.__class__ = state.origin
    set_grad_flags(layer, state.requires_grad)


def release(layer: _BatchNorm) -> None:
    """Give a layer bnctl took over its class back once nothing holds it (no policy, scope or domain).

    Skips counted on a device (never warned, to spare a host sync per forward) are reported then.
    """
    state: LayerState | None = layer.__dict__.get("_bnctl")
    if state is None or state.holds or _kept(layer, state):
        return
    layer.__class__ = state.origin
    del layer.__dict__["_bnctl"]
    if isinstance(state.counts.applied, Tensor) and state.counts.skipped:
        warn_in_user_code(
            f"{state.name}: {state.counts.skipped} running-statistics update(s) were skipped for non-finite "
            "statistics while bnctl controlled this layer; running_mean, running_var and "
            "num_batches_tracked kept their values then.",
            RuntimeWarning,
        )


def layer_policy(layer: _BatchNorm) -> Policy:
    """The policy a layer follows: its bnctl policy, or ``torch`` for a plain layer."""
    state: LayerState | None = layer.__dict__.get("_bnctl")
    return TORCH if state is None else state.policy


def layer_plan(layer: _BatchNorm) -> Plan:
    """What a layer does in train() and eval(): its :class:`~bnctl.policy.Plan`, plain layers included."""
    state: LayerState | None = layer.__dict__.get("_bnctl")
    if state is not None:
        return state.plan(layer)
    return make_plan(TORCH, momentum=layer.momentum, track_running_stats=layer.track_running_stats,
                     has_running_stats=layer.running_mean is not None)


def _kept(layer: _BatchNorm, state: LayerState) -> bool:
    """Whether something besides scopes keeps ``layer`` a bnctl layer: it was built as one, has a
    policy applied, or has domains."""
    return state.builtin or bool(state.policies) or len(domains(layer)) > 1


def grad_flags(layer: nn.Module) -> dict[str, bool]:
    """``requires_grad`` of the layer's own parameters, by name."""
    return {k: p.requires_grad for k, p in layer.named_parameters(recurse=False)}


def set_grad_flags(layer: nn.Module, flags: dict[str, bool]) -> None:
    """Set back flags from :func:`grad_flags` (parameters added since keep theirs)."""
    params = dict(layer.named_parameters(recurse=False))
    for key, flag in flags.items():
        if key in params:
            params[key].requires_grad_(flag)


def set_learn_affine(layer: _BatchNorm, learn: bool | None) -> None:
    """Set ``requires_grad`` of weight and bias; freezing also drops stale ``.grad``."""
    if learn is None:
        return
    for param in layer.parameters(recurse=False):  # per-domain affine included
        param.requires_grad_(learn)
        if not learn:
            param.grad = None


# -- classes ---------------------------------------------------------------------------------

_RUNTIME: dict[type, type[_PolicyForward]] = {}


def forget_class(cls: type) -> None:
    """Drop the class :func:`policy_class` made for ``cls`` (its registration changed)."""
    _RUNTIME.pop(cls, None)


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


def policy_class(cls: type, name: str = "layer") -> type[_PolicyForward]:
    """The class a layer of class ``cls`` takes under bnctl's control.

    The torch classes map to bnctl's own (``nn.BatchNorm2d`` to
    ``bnctl.BatchNorm2d``, ...). A third-party subclass gets a subclass of it
    whose BatchNorm computation follows the layer's policy, made once and
    cached: subclasses whose own ``forward`` calls ``super().forward`` keep
    their extra behaviour (bnctl's forward sits just below them in the MRO,
    in place of torch's); classes :mod:`bnctl.ecosystem` knows or that were
    registered there (:func:`~bnctl.ecosystem.register_subclass`) get the
    forward it gives them.

    Raises:
        TypeError: for a subclass that overrides ``forward`` without calling
            ``super().forward`` and is neither known nor registered.
    """
    if issubclass(cls, _PolicyForward):
        return cls
    if not issubclass(cls, _BatchNorm):
        raise TypeError(f"{name}: expected a BatchNorm layer (a torch.nn.modules.batchnorm._BatchNorm), got {cls!r}.")
    found = _STATIC.get(cls) or _RUNTIME.get(cls)
    if found is not None:
        return found
    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": f"policy_class.<{cls.__module__}.{cls.__qualname__}>",
        "_bnctl_origin": cls,
    }
    from .ecosystem import forward_for  # (other libraries' layers build on this module's classes)

    forward = forward_for(cls)
    if forward is not None:
        attrs["forward"] = forward
    elif not all(_calls_super_forward(vars(k)["forward"]) for k in _forward_overrides(cls)):
        raise _refusal(cls, name)
    base = _SyncPolicyForward if issubclass(cls, nn.SyncBatchNorm) else _PolicyForward
    new = cast("type[_PolicyForward]", type(cls.__name__, (cls, base), attrs))
    _RUNTIME[cls] = new
    return new


def _new_controlled(origin: type) -> nn.Module:
    """Unpickling a layer of a class made at run time: an empty instance, its state follows."""
    cls = policy_class(origin, origin.__name__)
    return cls.__new__(cls)


def _refusal(cls: type, name: str) -> TypeError:
    return TypeError(
        f"{name}: {cls.__module__}.{cls.__qualname__} overrides forward() without calling super().forward(), "
        "so bnctl cannot choose its statistics without dropping what that forward adds. Fixes: call "
        "super().forward(x) inside it, register the extra steps with bnctl.register_subclass(cls, "
        "after=lambda layer, y: ...), or leave the layer out with exclude=..."
    )


# -- drop-in layers ----------------------------------------------------------------------


class _Constructor:
    """The torch constructor plus ``policy=``; shared by the public classes."""

    def __init__(self, *args: Any, policy: str | Policy = "torch", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        resolved = get_policy(policy)
        name = type(self).__name__
        check_policy(name, self, resolved)  # type: ignore[arg-type]
        origin = next(k for k in type(self).__mro__ if k.__module__.startswith("torch."))
        self._bnctl = LayerState(name, origin, grad_flags(self), base=resolved, builtin=True)  # type: ignore[arg-type]
        set_learn_affine(self, resolved.learn_affine)  # type: ignore[arg-type]


class BatchNorm1d(_Constructor, nn.BatchNorm1d, _PolicyForward):
    """:class:`torch.nn.BatchNorm1d` that follows a :class:`bnctl.Policy`.

    Same arguments as the torch class, plus ``policy`` (a preset name or a
    Policy; default ``"torch"``, bit-identical to the torch class).

    Raises:
        ValueError: a policy that needs running statistics with
            ``track_running_stats=False``.

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

    Raises:
        ValueError: a policy that needs running statistics with
            ``track_running_stats=False``.

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

    Raises:
        ValueError: a policy that needs running statistics with
            ``track_running_stats=False``.

    Shape:
        - Input: ``(N, C, D, H, W)``; Output: same as input.
    """


class SyncBatchNorm(_Constructor, _SyncPolicyForward):
    """:class:`torch.nn.SyncBatchNorm` that follows a :class:`bnctl.Policy`.

    Without an initialized process group it behaves as the matching
    ``bnctl.BatchNorm*d``; with one, every batch statistic its policy uses
    or writes spans all ranks of its ``process_group`` (whatever the
    policy's ``sync``), on CPU (gloo) as on GPU.
    """


class BatchNormAct2d(BatchNorm2d):
    """:class:`bnctl.BatchNorm2d` followed by ``drop`` and ``act`` modules (timm's norm+act order).

    bnctl puts one in place of timm's ``FrozenBatchNormAct2d`` while a policy
    is applied (:mod:`bnctl.ecosystem`). ``drop`` and ``act`` default to
    ``nn.Identity()``.
    """

    def __init__(self, num_features: int, *args: Any, drop: nn.Module | None = None,
                 act: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


_STATIC: dict[type, type[_PolicyForward]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
