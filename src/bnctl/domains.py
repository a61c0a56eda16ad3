"""Domain-specific BatchNorm statistics (AdaBN, domain-specific BN).

Each BatchNorm layer can hold several named sets of running statistics (and,
optionally, of ``weight``/``bias``). ``with bnctl.domain(model, "target"):``
selects one: forwards inside the block read and update only that domain's
tensors. Outside any block the canonical tensors (``running_mean``, ...) are
used: they are the ``"default"`` domain.

State: domain ``d`` adds buffers ``running_mean__d``, ``running_var__d``,
``num_batches_tracked__d`` (and Parameters ``weight__d``, ``bias__d`` with
``affine=True``) to each layer, so they appear in ``state_dict()`` next to the
canonical keys. Loading a plain checkpoint (without those keys) initializes
every domain from the canonical values, so ``strict=True`` loading works.
:func:`export_domain` gives one domain as a plain torch model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .apply import Selector, _controlled, batchnorm_layers, revert
from .modules import _AFFINE, _STATS, DEFAULT, _key, domain_tensors, domains

__all__ = ["DEFAULT", "add_domains", "domain", "domains", "export_domain", "remove_domains"]

def _fill_missing_domains(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any
) -> None:
    """Load-state-dict pre-hook: a checkpoint without domain keys initializes every domain."""
    for name in domains(module)[1:]:
        for base in _STATS + _AFFINE:
            key = prefix + _key(base, name)
            own = getattr(module, _key(base, name), None)
            if own is not None and key not in state_dict and prefix + base in state_dict:
                state_dict[key] = state_dict[prefix + base]


def _check_name(name: object) -> str:
    if not (isinstance(name, str) and name.isidentifier() and name != DEFAULT and "__" not in name):
        raise ValueError(
            f"expected a domain name that is a Python identifier without '__' and not "
            f"{DEFAULT!r}, got {name!r}."
        )
    return name


def add_domains(
    model: nn.Module,
    names: Sequence[str],
    *,
    affine: bool = False,
    include: Selector = None,
    exclude: Selector = None,
) -> list[str]:
    """Give the selected BatchNorm layers extra named sets of statistics, in place.

    Each new domain starts as a copy of the layer's current statistics (and,
    with ``affine=True``, of its ``weight``/``bias`` as new Parameters with
    the same ``requires_grad``). Layers without running statistics are left
    out. A layer that is not yet a bnctl layer gets the ``torch`` policy
    (bit-identical to PyTorch).

    Args:
        model: a model or a single BatchNorm layer.
        names: new domain names (identifiers, not ``"default"``).
        affine: also give each domain its own ``weight`` and ``bias``.
        include, exclude: which layers (as in :func:`bnctl.apply`).

    Returns:
        The qualified names of the layers that got the domains.

    Raises:
        ValueError: a bad or already present name, or no layer selected.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> add_domains(model, ["target"])
        ['1']
        >>> sorted(k for k in model.state_dict() if k.startswith("1.running_mean"))
        ['1.running_mean', '1.running_mean__target']
    """
    names = [_check_name(n) for n in names]
    targets = [
        (n, m) for n, m in batchnorm_layers(model, include, exclude) if m.running_mean is not None
    ]
    if not targets:
        raise ValueError("expected at least one BatchNorm layer with running statistics, got none.")
    for lname, layer in targets:
        clash = sorted(set(names) & set(domains(layer)))
        if clash:
            raise ValueError(f"{lname or type(layer).__name__}: domain(s) {clash} already exist.")
    _controlled(targets)  # permanent: domains need bnctl's forward
    for _lname, layer in targets:
        for name in names:
            for base in _STATS:
                buf = getattr(layer, base)
                if buf is not None:
                    layer.register_buffer(_key(base, name), buf.detach().clone())
            if affine and layer.affine:
                for base in _AFFINE:
                    param = getattr(layer, base)
                    copy_ = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                    layer.register_parameter(_key(base, name), copy_)
        if not hasattr(layer, "_bnctl_domain_hook"):
            layer._bnctl_domain_hook = layer._register_load_state_dict_pre_hook(
                _fill_missing_domains, with_module=True
            )
    return [n or type(m).__name__ for n, m in targets]


def remove_domains(model: nn.Module) -> None:
    """Delete every extra domain (buffers, Parameters, hook); the default domain stays."""
    for _name, layer in batchnorm_layers(model):
        for name in domains(layer)[1:]:
            for base in _STATS:
                layer._buffers.pop(_key(base, name), None)
            for base in _AFFINE:
                layer._parameters.pop(_key(base, name), None)
        hook = layer.__dict__.pop("_bnctl_domain_hook", None)
        if hook is not None:
            hook.remove()
        layer.__dict__.pop("_bnctl_domain", None)


@contextlib.contextmanager
def domain(model: nn.Module, name: str) -> Iterator[None]:
    """Context manager: BatchNorm layers use domain ``name``'s statistics (and affine).

    Forwards inside the block read and update only that domain's tensors;
    other domains are untouched. Layers without that domain keep using
    their canonical tensors. Restores the previous selection on exit, also on
    error.

    Raises:
        ValueError: if no layer of the model has domain ``name``.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> _ = add_domains(bn, ["target"])
        >>> with domain(bn, "target"):
        ...     _ = bn.train()(torch.randn(8, 3) + 5)
        >>> int(bn.num_batches_tracked), int(bn.num_batches_tracked__target)
        (0, 1)
    """
    layers = [m for _, m in batchnorm_layers(model) if name == DEFAULT or name in domains(m)]
    if not layers:
        known = sorted({d for _, m in batchnorm_layers(model) for d in domains(m)})
        raise ValueError(
            f"expected a domain of the model, got {name!r}. Known domains: {known}. "
            "Add one with bnctl.add_domains(model, [name])."
        )
    previous = [layer.__dict__.get("_bnctl_domain") for layer in layers]
    try:
        for layer in layers:
            layer.__dict__["_bnctl_domain"] = name
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer.__dict__["_bnctl_domain"] = prev


def export_domain(model: nn.Module, name: str = DEFAULT) -> nn.Module:
    """A plain torch copy of ``model`` whose BatchNorm layers hold domain ``name``.

    The copy has PyTorch's own classes and state-dict keys (no domains, no
    policies); the original is unchanged.
    """
    exported = copy.deepcopy(model)
    with torch.no_grad():
        for _name, layer in batchnorm_layers(exported):
            if name != DEFAULT and name not in domains(layer):
                continue
            src = domain_tensors(layer, name)
            dst = domain_tensors(layer, DEFAULT)
            for target, value in zip(dst, src):
                if target is not None and value is not None and target is not value:
                    target.copy_(value)
    remove_domains(exported)
    return revert(exported)
