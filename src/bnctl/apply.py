"""Model-level control: apply a policy to chosen BatchNorm layers, and undo it.

Layers are matched by qualified name (``fnmatch`` patterns) or by a predicate,
changed in place (same object, Parameters, buffers and hooks), and restored
exactly by :meth:`PolicyHandle.remove`. ``Module.train()`` is never
overridden: a policy survives ``model.train()``/``model.eval()``.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Union, cast

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .ecosystem import Swap, is_frozen_batchnorm, swap_in, swap_out
from .modules import (
    BatchNormAct2d,
    check_policy,
    control,
    display_name,
    grad_flags,
    layer_state,
    release,
    revert_layer,
    set_grad_flags,
    set_learn_affine,
)
from .policy import Policy, get_policy
from .state import LayerState, domains, never_updated

__all__ = [
    "PolicyHandle",
    "apply",
    "revert",
    "param_groups",
    "batchnorm_layers",
    "apply_to",
]

Selector = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]


def _patterns(selector: Selector, what: str) -> list[str] | None:
    """The patterns of a selector given as strings; ``None`` for no selector or a predicate."""
    if selector is None or callable(selector):
        return None
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{what}: expected a module name, an fnmatch pattern, a list of them or a predicate "
            f"(name, module) -> bool, got {selector!r}."
        )
    return patterns


def matches(name: str, pattern: str) -> bool:
    """Whether qualified name ``name`` is selected by ``pattern``: a module name or an ``fnmatch`` pattern
    selects the modules it names and everything under them (``"layer1"`` selects ``layer1.0.bn1``, as timm's
    ``freeze(model, ["layer1"])`` does; ``"layer1"`` does not select ``layer10``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _matcher(selector: Selector, what: str) -> Callable[[str, nn.Module], bool] | None:
    patterns = _patterns(selector, what)
    if patterns is None:
        return selector  # type: ignore[return-value]
    return lambda name, _module: any(matches(name, p) for p in patterns)


def _check_patterns(model: nn.Module, include: Selector) -> None:
    """Raise for an ``include`` pattern that names no module of ``model`` at all (a typo), suggesting the
    closest names. (An ``exclude`` pattern may name nothing: generic code excludes what some models lack.)"""
    patterns = _patterns(include, "include")
    if not patterns:
        return
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(matches(name, pattern) for name in names + [""]):
            raise ValueError(f"include: expected module names or fnmatch patterns of the model, got {pattern!r}, "
                             f"which matches no module. {_suggest(pattern, names)}")


def _suggest(pattern: str, names: list[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    if close:
        return f"Closest module names: {close}."
    tops = sorted({name.split(".")[0] for name in names})
    return f"Top-level modules: {tops[:20]}{' ...' if len(tops) > 20 else ''}."


def batchnorm_layers(
    model: nn.Module, include: Selector = None, exclude: Selector = None
) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of ``model`` (itself included) selected by ``include``/``exclude``.

    Buffers-only ``FrozenBatchNorm2d`` layers (torchvision, timm, detectron2;
    see :mod:`bnctl.ecosystem`) are listed too.

    Args:
        model: a model, or a single BatchNorm layer.
        include: keep only layers in or under the modules named by a
            qualified name or ``fnmatch`` pattern (a string or a list of them:
            ``"layer1"`` keeps every BatchNorm layer under ``model.layer1``,
            ``"*.bn1"`` every ``bn1``), or for which a predicate
            ``(name, module) -> bool`` is true. ``None`` keeps all.
        exclude: drop the layers it selects (same forms).

    Returns:
        ``(qualified name, layer)`` pairs in ``named_modules`` order. The name
        of ``model`` itself, when it is a BatchNorm layer, is ``""``.

    Raises:
        ValueError: an ``include`` name or pattern that matches no module of
            the model (a typo), naming the closest module names.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)),
        ...                             torch.nn.BatchNorm2d(4))
        >>> [name for name, _ in batchnorm_layers(model, include="0")]
        ['0.1']
    """
    _check_patterns(model, include)
    keep, drop = _matcher(include, "include"), _matcher(exclude, "exclude")
    return [
        (name, module)
        for name, module in model.named_modules()
        if (isinstance(module, _BatchNorm) or is_frozen_batchnorm(module))
        and (keep is None or keep(name, module))
        and (drop is None or not drop(name, module))
    ]


class PolicyHandle:
    """Undo for :func:`apply`. ``remove()`` restores exactly what was there.

    Restores each layer's policy (the one under it, or plain torch), its
    class and the ``requires_grad`` flags of its parameters (not ``.grad``
    values that freezing cleared). A ``FrozenBatchNorm2d`` the policy was
    applied to goes back into its parent, holding the stand-in's current
    values (what was learned or recalibrated is kept). Scopes (``no_update``, ``accumulate``,
    domains) are not policies: they hold across ``apply``/``remove``. Handles
    on the same layers must be removed in reverse order of application; a
    handle removed out of order raises instead of corrupting state. Also a
    context manager: ``with bnctl.apply(...):`` removes on exit.
    """

    def __init__(self) -> None:
        self._applied: list[tuple[_BatchNorm, LayerState, object, dict[str, bool]]] = []
        self._swaps: list[Swap] = []
        self.layers: list[str] = []

    def _push(self, name: str, layer: _BatchNorm, policy: Policy, process_group: Any = None) -> None:
        flags = grad_flags(layer)
        state = control(layer, name)
        token = object()
        state.push(token, policy, process_group)
        self._applied.append((layer, state, token, flags))
        self.layers.append(display_name(name, layer))
        set_learn_affine(layer, policy.learn_affine)

    def remove(self) -> None:
        """Restore every layer this handle changed (idempotent)."""
        live = [entry for entry in self._applied if layer_state(entry[0]) is entry[1]]
        for _layer, state, token, _flags in live:  # refuse before changing anything
            state.require_top(token)
        for swap in self._swaps:
            extra = domains(swap.stand_in)[1:]
            if extra:
                raise ValueError(
                    f"{swap.name}: the bnctl.BatchNorm2d standing in for a {type(swap.original).__name__} holds "
                    f"domain(s) {extra}, which the buffers-only original cannot hold: removing the policy would "
                    "lose them. Keep them with bnctl.export_domain(model, name) or drop them with "
                    "bnctl.remove_domains(model) first, then remove the policy."
                )
        for layer, state, token, flags in reversed(live):
            state.pop(token)
            set_grad_flags(layer, flags)
            release(layer)
        for swap in reversed(self._swaps):  # FrozenBatchNorm2d back, with the current values
            swap_out(swap)
        self._applied = []
        self._swaps = []
        self.layers = []

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PolicyHandle({len(self.layers)} layers)"


def apply(
    model: nn.Module,
    policy: str | Policy,
    include: Selector = None,
    exclude: Selector = None,
    *,
    process_group: Any = None,
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
        include: which layers: a module's qualified name (that module and
            everything under it, e.g. ``"layer1"``), an ``fnmatch`` pattern,
            a list of these, or a predicate ``(name, module) -> bool``.
        exclude: which layers to leave alone (same forms).
        process_group: the ``torch.distributed`` group over which layers with
            a ``sync=True`` policy (and ``nn.SyncBatchNorm`` layers) compute
            batch statistics; default: an ``nn.SyncBatchNorm``'s own
            ``process_group``, else the world group.

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
    _check_group(process_group)
    targets = _with_aux(batchnorm_layers(model, include, exclude))
    if not targets:
        found = [display_name(n, m) for n, m in batchnorm_layers(model)]
        close = difflib.get_close_matches(include, found, n=3, cutoff=0.3) if isinstance(include, str) else []
        raise ValueError(
            f"expected at least one BatchNorm layer to apply {resolved.label!r} "
            f"to, got none (include={include!r}, exclude={exclude!r}). "
            + (f"Closest BatchNorm layers: {close}. " if close else "")
            + f"BatchNorm layers in the model: {found or 'none'}."
        )
    _check_not_wrapped(model, targets, resolved)
    handle = apply_to(targets, resolved, model, process_group=process_group)
    if resolved.reads_running_stats and not resolved.updates:
        stale = [display_name(n, m) for n, m in targets if never_updated(*_stats(m))]
        if stale:
            warnings.warn(
                f"policy {resolved.label!r} normalizes with running statistics that "
                f"were never updated (running_mean all 0, running_var all 1, "
                f"num_batches_tracked 0) in {len(stale)} layer(s): {', '.join(stale[:5])}"
                f"{', ...' if len(stale) > 5 else ''}. Load pretrained weights first, or run "
                "bnctl.recalibrate on data.",
                UserWarning,
                stacklevel=2,
            )
    return handle


def _stats(layer: _BatchNorm) -> tuple[Any, Any, Any]:
    return layer.running_mean, layer.running_var, getattr(layer, "num_batches_tracked", None)


def _check_group(group: Any) -> None:
    """Raise unless ``group`` is ``None`` or a process group this process belongs to."""
    if group is None:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: expected None without an initialized torch.distributed process group, "
                         f"got {group!r}. Call torch.distributed.init_process_group first.")
    if group is dist.GroupMember.NON_GROUP_MEMBER or (isinstance(group, dist.ProcessGroup)
                                                      and dist.get_rank(group) < 0):
        got = ("GroupMember.NON_GROUP_MEMBER (what torch.distributed.new_group(ranks) returns on the ranks not "
               "in ranks)" if group is dist.GroupMember.NON_GROUP_MEMBER else "one it is not a member of")
        raise ValueError(f"process_group: expected a group this rank ({dist.get_rank()}) belongs to, got {got}. "
                         "Fix: pass each rank the group it is in (torch.distributed.new_subgroups gives each "
                         "rank its own), or apply the policy with sync=False on the ranks outside the group.")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup, got {type(group).__name__}.")


def _check_not_wrapped(model: nn.Module, layers: list[tuple[str, _BatchNorm]], policy: Policy) -> None:
    """Refuse to change the parameters a ``DistributedDataParallel`` wrapper already registered."""
    if not any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        return
    changes = [
        display_name(n, m) for n, m in layers
        if is_frozen_batchnorm(m) or (policy.learn_affine is not None and any(
            p.requires_grad != policy.learn_affine for p in m.parameters(recurse=False)))
    ]
    if changes:
        raise ValueError(
            f"{changes[0]}: the model is wrapped in DistributedDataParallel, which fixed the parameters it "
            f"all-reduces when it was built, and policy {policy.label!r} changes them (requires_grad of "
            "BatchNorm weight/bias, or a FrozenBatchNorm2d replaced): gradients would silently not be "
            "all-reduced, then DDP would raise. Apply the policy before wrapping: bnctl.apply(model, ...), "
            "then DistributedDataParallel(model, ...)."
        )


def _with_aux(layers: list[tuple[str, _BatchNorm]]) -> list[tuple[str, _BatchNorm]]:
    """``layers`` plus the auxiliary layers (``aux_bn``) of timm ``SplitBatchNorm2d`` among them:
    the splits of a batch follow the policy of the layer they belong to."""
    chosen = {id(m) for _, m in layers}
    extra = []
    for name, layer in layers:
        aux_bn = getattr(layer, "aux_bn", None)
        if isinstance(aux_bn, nn.ModuleList):
            extra += [(f"{name}.aux_bn.{i}" if name else f"aux_bn.{i}", aux)
                      for i, aux in enumerate(aux_bn) if isinstance(aux, _BatchNorm) and id(aux) not in chosen]
    return layers + extra


def apply_to(
    layers: list[tuple[str, _BatchNorm]], policy: Policy, model: nn.Module | None = None, *,
    process_group: Any = None,
) -> PolicyHandle:
    """:func:`apply` on a list of ``(name, layer)``: every layer checked first, then all or nothing.

    A ``FrozenBatchNorm2d`` among them is replaced in ``model`` by a
    ``bnctl.BatchNorm2d`` stand-in that gets the policy (:mod:`bnctl.ecosystem`).
    """
    for name, layer in layers:
        if not is_frozen_batchnorm(layer):
            check_policy(display_name(name, layer), layer, policy)
        elif model is None or not name:
            swap_in(layer, "", layer)  # raises, naming the fix
    handle = PolicyHandle()
    try:
        for name, layer in layers:
            if is_frozen_batchnorm(layer):
                # (a model: checked above, swap_in raised otherwise)
                handle._swaps.append(swap_in(cast(nn.Module, model), name, layer))
                layer = handle._swaps[-1].stand_in
            handle._push(name, layer, policy, process_group)
    except BaseException:
        handle.remove()  # never leave a model half-converted
        raise
    return handle


def revert(model: nn.Module) -> nn.Module:
    """Turn every bnctl layer of ``model`` back into a plain torch module, in place.

    Each layer gets back the class it had before bnctl (``bnctl.BatchNorm2d``
    becomes ``torch.nn.BatchNorm2d``) and the ``requires_grad`` flags its
    parameters had then; Parameters and buffers keep their values. Handles
    still open on it have nothing left to undo. Use it before handing the
    model to a tool that checks exact classes.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: if a layer has extra domains (see :func:`bnctl.export_domain`).
    """
    layers = batchnorm_layers(model)
    with_domains = [display_name(n, m) for n, m in layers if len(domains(m)) > 1]
    if with_domains:
        raise ValueError(
            f"{with_domains[0]}: expected a layer without extra domains, got one with domains "
            "(their statistics would stay in the state dict). Use bnctl.export_domain(model, "
            "name) for a plain model of one domain, or bnctl.remove_domains(model) first."
        )
    stand_ins = [display_name(n, m) for n, m in layers if isinstance(m, BatchNormAct2d)]
    if stand_ins:
        raise ValueError(
            f"{stand_ins[0]}: expected a layer with a plain torch class, got bnctl's BatchNormAct2d, which "
            "stands in for a FrozenBatchNormAct2d while a policy is applied. Remove that policy's handle "
            "(handle.remove() puts the original back) instead."
        )
    for _name, layer in layers:
        revert_layer(layer)
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

    Raises:
        ValueError: no parameter is trainable (an optimizer would have nothing to do).

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
    if not bn_params and not other:
        raise ValueError(
            "expected trainable parameters, got none: every parameter of the model has "
            "requires_grad=False. A frequent cause is freezing the whole model after applying a "
            "policy that learns (apply sets requires_grad on BatchNorm's weight and bias; a later "
            "model.requires_grad_(False) turns it off again). To train only BatchNorm, use "
            "bnctl.train_only_batchnorm(model)."
        )
    groups = [
        {"name": "batchnorm", "params": bn_params, "lr": lr if bn_lr is None else bn_lr,
         "weight_decay": bn_weight_decay, **options},
        {"name": "other", "params": other, "lr": lr, "weight_decay": weight_decay, **options},
    ]
    return [g for g in groups if g["params"]]
