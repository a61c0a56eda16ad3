"""Model-level control: apply a policy to chosen BatchNorm layers, and undo it.

Layers are matched by qualified name (``fnmatch`` patterns) or by a predicate,
changed in place (same object, Parameters, buffers and hooks), and restored
exactly by :meth:`PolicyHandle.remove`. ``Module.train()`` is never
overridden: a policy survives ``model.train()``/``model.eval()``.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .modules import LayerState, layer_policy, policy_class, set_policy
from .policy import TORCH, Policy, get_policy, replace

__all__ = [
    "PolicyHandle",
    "apply",
    "using",
    "revert",
    "no_update",
    "param_groups",
    "batchnorm_layers",
]

Selector = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]


def _matcher(selector: Selector, what: str) -> Callable[[str, nn.Module], bool] | None:
    if selector is None:
        return None
    if isinstance(selector, str):
        selector = [selector]
    if callable(selector):
        return selector  # type: ignore[return-value]
    patterns = list(selector)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{what}: expected an fnmatch pattern, a list of patterns or a predicate "
            f"(name, module) -> bool, got {selector!r}."
        )
    return lambda name, _module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _display_name(name: str, module: nn.Module) -> str:
    return name or type(module).__name__


def batchnorm_layers(
    model: nn.Module, include: Selector = None, exclude: Selector = None
) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of ``model`` (itself included) selected by ``include``/``exclude``.

    Args:
        model: a model, or a single BatchNorm layer.
        include: keep only layers whose qualified name matches an ``fnmatch``
            pattern (a string or a list of them), or for which a predicate
            ``(name, module) -> bool`` is true. ``None`` keeps all.
        exclude: drop the layers it matches (same forms).

    Returns:
        ``(qualified name, layer)`` pairs in ``named_modules`` order. The name
        of ``model`` itself, when it is a BatchNorm layer, is ``""``.
    """
    keep, drop = _matcher(include, "include"), _matcher(exclude, "exclude")
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        and (keep is None or keep(name, module))
        and (drop is None or not drop(name, module))
    ]


_TORCH_MODES = (TORCH.mode(True), TORCH.mode(False))


def _check_layer(name: str, layer: _BatchNorm, policy: Policy) -> None:
    """Raise before anything changes if ``policy`` cannot run on ``layer``."""
    if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
        raise ValueError(
            f"{name}: expected a materialized layer, got an uninitialized "
            f"{type(layer).__name__}. Run one forward pass (or call the model on a dummy "
            "batch) before applying a bnctl policy."
        )
    policy_class(type(layer), name)  # raises for subclasses it cannot handle
    # Without running statistics a layer always normalizes with the batch and updates
    # nothing (PyTorch's own rule); refuse policies that would silently mean otherwise.
    needs_stats = (
        policy.train_normalize != "batch"
        or policy.eval_normalize not in ("batch", "running")
        or (policy.updates and (policy.mode(True), policy.mode(False)) != _TORCH_MODES)
    )
    if layer.running_mean is None and needs_stats:
        raise ValueError(
            f"{name}: policy {policy.name or 'custom'!r} needs running statistics, but the "
            "layer has none (built with track_running_stats=False). Exclude it, or use a "
            "policy that normalizes with batch statistics and updates nothing (e.g. "
            "'test_time')."
        )


def _never_updated(layer: _BatchNorm) -> bool:
    if layer.running_mean is None or layer.num_batches_tracked is None:
        return False
    return (
        int(layer.num_batches_tracked) == 0
        and bool((layer.running_mean == 0).all())
        and bool((layer.running_var == 1).all())
    )


class PolicyHandle:
    """Undo for :func:`apply`. ``remove()`` restores exactly what was there.

    Restores each layer's class, policy state and the ``requires_grad`` flags
    of its parameters (not ``.grad`` values that freezing cleared). Handles
    on the same layers must be removed in reverse order of application; a
    handle removed out of order raises instead of corrupting state. Also a
    context manager: ``with bnctl.apply(...):`` removes on exit.
    """

    def __init__(self) -> None:
        self._saved: list[tuple[_BatchNorm, type, LayerState | None, LayerState, tuple]] = []
        self.layers: list[str] = []

    def _set(self, layer: _BatchNorm, policy: Policy, name: str) -> None:
        cls, previous = type(layer), getattr(layer, "_bnctl", None)
        flags = tuple(p.requires_grad for p in layer.parameters(recurse=False))
        state = set_policy(layer, policy, name)
        self._saved.append((layer, cls, previous, state, flags))
        self.layers.append(name)

    def remove(self) -> None:
        """Restore every layer this handle changed (idempotent)."""
        for layer, _cls, _prev, installed, _flags in self._saved:
            if getattr(layer, "_bnctl", None) is not installed:
                raise RuntimeError(
                    f"{installed.name}: expected the policy this handle applied, found another "
                    "one. Remove handles in reverse order of application (or use bnctl.using "
                    "as a context manager)."
                )
        while self._saved:
            layer, cls, prev, _installed, flags = self._saved.pop()
            layer.__class__ = cls
            if prev is None:
                del layer._bnctl
            else:
                layer._bnctl = prev
            for param, flag in zip(layer.parameters(recurse=False), flags):
                param.requires_grad_(flag)
        self.layers = []

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PolicyHandle({len(self.layers)} layers)"


def _apply(
    targets: list[tuple[str, _BatchNorm]], policy_for: Callable[[_BatchNorm], Policy]
) -> PolicyHandle:
    """Check every target first, then set each policy; all or nothing."""
    policies = []
    for name, layer in targets:
        policy = policy_for(layer)
        _check_layer(_display_name(name, layer), layer, policy)
        policies.append(policy)
    handle = PolicyHandle()
    try:
        for (name, layer), policy in zip(targets, policies):
            handle._set(layer, policy, _display_name(name, layer))
    except BaseException:
        handle.remove()  # never leave a model half-converted
        raise
    return handle


def _controlled(targets: list[tuple[str, _BatchNorm]]) -> PolicyHandle:
    """Give the plain layers among ``targets`` the ``torch`` policy (bit-identical), so bnctl
    controls their forward; the handle turns them back."""
    return _apply([(n, m) for n, m in targets if "_bnctl" not in m.__dict__], lambda _m: TORCH)


def apply(
    model: nn.Module,
    policy: str | Policy,
    include: Selector = None,
    exclude: Selector = None,
) -> PolicyHandle:
    """Give the selected BatchNorm layers of ``model`` a policy, in place.

    Each layer keeps its identity, Parameters, buffers, hooks and
    ``isinstance`` checks (so optimizers, EMA copies and DDP keep working)
    and its state-dict keys. The policy holds under any sequence of
    ``model.train()``/``model.eval()``. ``learn_affine`` sets
    ``requires_grad`` (freezing also clears stale ``.grad``).

    Args:
        model: a model, or a single BatchNorm layer.
        policy: a preset name (see :data:`bnctl.PRESETS`) or a :class:`bnctl.Policy`.
        include: which layers: an ``fnmatch`` pattern on qualified names, a
            list of patterns, or a predicate ``(name, module) -> bool``.
        exclude: which layers to leave alone (same forms).

    Returns:
        A :class:`PolicyHandle`; ``handle.remove()`` restores what was there.

    Raises:
        ValueError: unknown preset, no layer selected, an uninitialized lazy
            layer, or a policy that needs running statistics on a layer
            without them.
        TypeError: a BatchNorm subclass whose ``forward`` bnctl cannot
            control without dropping behaviour (see
            :func:`bnctl.register_subclass`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> handle = apply(model, "frozen")
        >>> _ = model.train()(torch.randn(2, 3, 8, 8))
        >>> int(model[1].num_batches_tracked), model[1].weight.requires_grad
        (0, False)
        >>> handle.remove()
        >>> model[1].weight.requires_grad
        True
    """
    resolved = get_policy(policy)
    targets = batchnorm_layers(model, include, exclude)
    if not targets:
        found = [n or type(m).__name__ for n, m in batchnorm_layers(model)]
        raise ValueError(
            f"expected at least one BatchNorm layer to apply {resolved.name or 'the policy'!r} "
            f"to, got none (include={include!r}, exclude={exclude!r}). BatchNorm layers in the "
            f"model: {found or 'none'}."
        )
    handle = _apply(targets, lambda _layer: resolved)
    if resolved.reads_running_stats and not resolved.updates:
        stale = [n for n, layer in zip(handle.layers, (t for _, t in targets)) if _never_updated(layer)]
        if stale:
            warnings.warn(
                f"policy {resolved.name or 'custom'!r} normalizes with running statistics that "
                f"were never updated (running_mean all 0, running_var all 1, "
                f"num_batches_tracked 0) in {len(stale)} layer(s): {', '.join(stale[:5])}"
                f"{', ...' if len(stale) > 5 else ''}. Load pretrained weights first, or run "
                "bnctl.recalibrate on data.",
                UserWarning,
                stacklevel=2,
            )
    return handle


@contextmanager
def using(
    model: nn.Module, policy: str | Policy, include: Selector = None, exclude: Selector = None
) -> Iterator[PolicyHandle]:
    """Context manager: :func:`apply` on entry, ``remove()`` on exit (also on error).

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> with using(bn, "frozen"):
        ...     _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked), type(bn) is torch.nn.BatchNorm1d
        (0, True)
    """
    handle = apply(model, policy, include, exclude)
    try:
        yield handle
    finally:
        handle.remove()


@contextmanager
def no_update(model: nn.Module) -> Iterator[None]:
    """Context manager: normalization unchanged, no running statistic updated.

    Every BatchNorm layer keeps what it normalizes with (under its current
    policy and ``training`` flag), but nothing is written to its buffers.
    For adversarial attacks, extra loss passes, or gradient-checkpoint
    recomputation. Restores on exit, also on error.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3).train()
        >>> with no_update(bn):
        ...     _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked)
        0
    """
    def frozen_updates(layer: _BatchNorm) -> Policy:
        return replace(layer_policy(layer), train_update="none", eval_update="none", learn_affine=None)

    handle = _apply(batchnorm_layers(model), frozen_updates)
    try:
        yield
    finally:
        handle.remove()


def revert(model: nn.Module) -> nn.Module:
    """Turn every bnctl layer of ``model`` back into a plain torch module, in place.

    Each layer gets back the class it had before bnctl (``bnctl.BatchNorm2d``
    becomes ``torch.nn.BatchNorm2d``) and the ``requires_grad`` flags its
    parameters had then; Parameters and buffers keep their values. Use it
    before pickling a whole model or exporting.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: if a layer has extra domains (see :func:`bnctl.export_domain`).
    """
    layers = batchnorm_layers(model)
    with_domains = [n or type(m).__name__ for n, m in layers if "_bnctl_domain_hook" in m.__dict__]
    if with_domains:
        raise ValueError(
            f"{with_domains[0]}: expected a layer without extra domains, got one with domains "
            "(their statistics would stay in the state dict). Use bnctl.export_domain(model, "
            "name) for a plain model of one domain, or bnctl.remove_domains(model) first."
        )
    for _name, layer in layers:
        state: LayerState | None = getattr(layer, "_bnctl", None)
        if state is None:
            continue
        layer.__class__ = state.origin
        del layer._bnctl
        if state.requires_grad is not None:
            layer.weight.requires_grad_(state.requires_grad[0])
            layer.bias.requires_grad_(state.requires_grad[1])
    return model


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    bn_lr: float | None = None,
    weight_decay: float = 0.0,
    bn_weight_decay: float = 0.0,
    **options: Any,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with their own settings for BatchNorm.

    BatchNorm parameters are found by module type (any ``_BatchNorm``
    subclass), not by parameter name. Every trainable parameter appears
    exactly once (shared ones in the first group that reaches them); frozen
    ones (``requires_grad=False``) are left out, and empty groups dropped.

    Args:
        model: the model.
        lr: learning rate of every other parameter.
        bn_lr: learning rate of BatchNorm weight and bias (default: ``lr``).
        weight_decay: weight decay of every other parameter.
        bn_weight_decay: weight decay of BatchNorm parameters (default 0).
        **options: further settings for both groups (e.g. ``momentum``).

    Returns:
        A list of dicts for ``torch.optim.*(groups)``; the BatchNorm group
        comes first and carries ``"name": "batchnorm"``, the other ``"name": "other"``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> groups = param_groups(model, lr=0.1, bn_lr=1e-4)
        >>> [(g["name"], len(g["params"]), g["lr"]) for g in groups]
        [('batchnorm', 2, 0.0001), ('other', 2, 0.1)]
        >>> opt = torch.optim.SGD(groups, momentum=0.9)
    """
    seen: set[int] = set()

    def take(params: Iterator[nn.Parameter]) -> list[nn.Parameter]:
        out = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    bn_params = take(
        p for _, layer in batchnorm_layers(model) for p in layer.parameters(recurse=False)
    )
    other = take(model.parameters())
    groups = [
        {"name": "batchnorm", "params": bn_params, "lr": lr if bn_lr is None else bn_lr,
         "weight_decay": bn_weight_decay, **options},
        {"name": "other", "params": other, "lr": lr, "weight_decay": weight_decay, **options},
    ]
    return [g for g in groups if g["params"]]
