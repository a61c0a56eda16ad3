"""Domain-specific BatchNorm statistics (AdaBN, domain-specific BN).

Each BatchNorm layer can hold several named sets of running statistics (and,
optionally, of ``weight``/``bias``). ``with bnctl.domain(model, "target"):``
selects one: forwards inside the block read and update only that domain's
tensors, and the layer's ``running_mean`` (...) attributes are that domain's.
Outside any block the canonical tensors (``running_mean``, ...) are used: they
are the ``"default"`` domain.

State: domain ``d`` adds buffers ``running_mean__d``, ``running_var__d``,
``num_batches_tracked__d`` (and Parameters ``weight__d``, ``bias__d`` with
``affine=True``) to each layer, so they appear in ``state_dict()`` next to the
canonical keys. Loading a plain checkpoint (without those keys) initializes
every domain from the canonical values, so ``strict=True`` loading works (the
layer class does it, in ``_load_from_state_dict``). :func:`export_domain`
gives one domain as a plain torch model.

This module is the user-facing API; the tensors of a domain and the selected
domain live in each layer's state (:mod:`bnctl.state`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .apply import Selector, batchnorm_layers, revert
from .fold import unfold
from .frozen import is_frozen_batchnorm
from .modules import control, display_name, layer_state, release
from .state import AFFINE, DEFAULT, STATS, LayerTensors, domain_key, domains

__all__ = ["DEFAULT", "add_domains", "domain", "domains", "export_domain", "layers_with", "remove_domains"]


def _check_name(name: object) -> str:
    if not (isinstance(name, str) and name.isidentifier() and name != DEFAULT and "__" not in name):
        raise ValueError(
            f"expected a domain name that is a Python identifier without '__' and not "
            f"{DEFAULT!r}, got {name!r}."
        )
    return name


def add_domains(
    model: nn.Module,
    names: str | Sequence[str],
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
        names: a new domain name, or several (identifiers, not ``"default"``).
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
    names = [_check_name(n) for n in ([names] if isinstance(names, str) else names)]
    targets = [
        (n, m) for n, m in batchnorm_layers(model, include, exclude) if m.running_mean is not None
    ]
    if not targets:
        raise ValueError("expected at least one BatchNorm layer with running statistics, got none.")
    frozen = [(n, m) for n, m in targets if is_frozen_batchnorm(m)]
    if frozen:
        lname, layer = frozen[0]
        raise ValueError(
            f"{display_name(lname, layer)}: a buffers-only {type(layer).__name__} cannot hold domains. Apply "
            "a policy first (bnctl.apply(model, 'frozen') puts an equivalent bnctl.BatchNorm2d in its place, "
            "whose domains last while the policy is applied), or leave it out with exclude=..."
        )
    for lname, layer in targets:
        clash = sorted(set(names) & set(domains(layer)))
        if clash:
            raise ValueError(f"{display_name(lname, layer)}: domain(s) {clash} already exist.")
    for lname, layer in targets:
        control(layer, lname)._program = None  # domains need bnctl's forward; they keep the layer controlled
        for name in names:
            for base in STATS:
                buf = getattr(layer, base)
                if buf is not None:
                    layer.register_buffer(domain_key(base, name), buf.detach().clone())
            if affine and layer.affine:
                for base in AFFINE:
                    param = getattr(layer, base)
                    copy_ = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                    layer.register_parameter(domain_key(base, name), copy_)
    return [display_name(n, m) for n, m in targets]


def remove_domains(model: nn.Module) -> None:
    """Delete every extra domain (buffers, Parameters); the default domain stays."""
    for _name, layer in batchnorm_layers(model):
        for name in domains(layer)[1:]:
            for base in STATS:
                layer._buffers.pop(domain_key(base, name), None)
            for base in AFFINE:
                layer._parameters.pop(domain_key(base, name), None)
        state = layer_state(layer)
        if state is not None:
            state.domain = DEFAULT
            release(layer)


@contextlib.contextmanager
def domain(model: nn.Module, name: str) -> Iterator[None]:
    """Context manager: BatchNorm layers use domain ``name``'s statistics (and affine).

    Forwards inside the block read and update only that domain's tensors;
    other domains are untouched. Inside the block each layer's own
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (and
    ``weight``/``bias`` where the domain has its own) are the domain's
    tensors — to read, assign or copy into — while ``state_dict()`` keeps
    naming every tensor by its domain: a checkpoint saved inside the block
    equals one saved outside, and loading inside fills each domain from its
    own keys. :func:`bnctl.report` shows the active domain. Layers without
    that domain keep using their canonical tensors. Restores the previous
    selection on exit, also on error.

    Raises:
        ValueError: if no layer of the model has domain ``name``.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> _ = add_domains(bn, "target")
        >>> with domain(bn, "target"):
        ...     _ = bn.train()(torch.randn(8, 3) + 5)
        ...     int(bn.num_batches_tracked)  # the target domain's
        1
        >>> int(bn.num_batches_tracked), int(bn.num_batches_tracked__target)
        (0, 1)
    """
    layers = layers_with(model, name)
    states = [state for state in map(layer_state, layers) if state is not None]
    previous = [state.domain for state in states]
    try:
        for state in states:
            state.domain = name
        yield
    finally:
        for state, prev in zip(states, previous):
            state.domain = prev


def layers_with(model: nn.Module, name: str) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that have domain ``name``; raises if there are none."""
    layers = [m for _, m in batchnorm_layers(model) if name in domains(m)]
    if not layers:
        known = sorted({d for _, m in batchnorm_layers(model) for d in domains(m)})
        raise ValueError(
            f"expected a domain of the model, got {name!r}. Known domains: {known}. "
            "Add one with bnctl.add_domains(model, [name])."
        )
    return layers


def export_domain(model: nn.Module, name: str = DEFAULT) -> nn.Module:
    """A plain torch copy of ``model`` whose BatchNorm layers hold domain ``name``.

    The copy has PyTorch's own classes and state-dict keys (no domains, no
    policies, no fold); the original is unchanged. Layers without that domain keep
    their default statistics.

    Raises:
        ValueError: if no layer of the model has domain ``name``.
    """
    layers_with(model, name)
    exported = copy.deepcopy(model)
    with torch.no_grad():
        for _name, layer in batchnorm_layers(exported):
            if name not in domains(layer):
                continue
            src, dst = LayerTensors.of(layer, name), LayerTensors.of(layer, DEFAULT)
            for target, value in zip(dst, src):
                if target is not None and value is not None and target is not value:
                    target.copy_(value)
    remove_domains(exported)
    unfold(exported)  # (a folded model's copy carries fold's forwards and hooks)
    return revert(exported)
