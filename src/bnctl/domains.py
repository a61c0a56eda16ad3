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

import copy
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch
from torch import Tensor, nn

from .apply import Selector, batchnorm_layers, revert
from .ecosystem import is_frozen_batchnorm
from .fold import unfold
from .modules import control, display_name, layer_state, release
from .state import AFFINE, DEFAULT, STATS, LayerTensors, domain_key, domains

__all__ = ["DEFAULT", "Labels", "Routing", "add_domains", "domains", "export_domain", "layers_with", "remove_domains"]

Labels = Union[str, Sequence[str], Tensor]


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
        control(layer, lname)._programs = {}  # domains need bnctl's forward; they keep the layer controlled
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


def _layers_with_domains(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers a mixed-domain block routes: every BatchNorm layer with more domains than the default."""
    layers: list[tuple[str, nn.Module]] = [(n, m) for n, m in batchnorm_layers(model) if len(domains(m)) > 1]
    if not layers:
        raise ValueError("bnctl.domain: expected a model with domains for one label per sample, got none. Add "
                         "them with bnctl.add_domains(model, names).")
    return layers


class _Split(NamedTuple):
    """One layer's mixed-domain batch in parts: the domain of each part and its samples, as sizes (labels
    sorted by domain: the parts are views of consecutive samples, the outputs concatenate) or as index
    tensors (gathered, and the outputs scattered back). One extra pass over the batch each way where sorted,
    two where not (``torch.split``'s and the gather's gradients are one pass each, where per-part slicing
    or ``index_select`` would build a zero-filled batch per part)."""

    domains: list[str]
    samples: list[int] | list[Tensor]  # (not `index`, which would hide tuple.index)

    def inputs(self, x: Tensor) -> list[Tensor]:
        if isinstance(self.samples[0], int):
            return list(x.split(self.samples))  # type: ignore[arg-type]
        return list(_Gather.apply(x, *self.samples))

    def merge(self, outs: list[Tensor]) -> Tensor:
        if isinstance(self.samples[0], int):
            return torch.cat(outs)
        return _Scatter.apply(self.samples, *outs)


def _rows_like(t: Tensor, n: int) -> Tensor:
    """An uninitialized tensor of ``n`` rows shaped as ``t``'s, in ``t``'s memory format."""
    out = t.new_empty((n, *t.shape[1:]))
    if t.dim() in (4, 5) and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d):
        out = out.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return out


class _Gather(torch.autograd.Function):
    """The rows of ``x`` at each index (disjoint, covering ``x``): one pass; its gradient scatters back in one."""

    @staticmethod
    def forward(ctx, x: Tensor, *index: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.index = index
        return tuple(x.index_select(0, i) for i in index)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (_Scatter.apply(ctx.index, *grads), *(None,) * len(ctx.index))


class _Scatter(torch.autograd.Function):
    """Parts put back at their rows (disjoint indices covering the output): one pass each way."""

    @staticmethod
    def forward(ctx, index: list[Tensor], *parts: Tensor) -> Tensor:  # type: ignore[override]
        ctx.index = index
        out = _rows_like(parts[0], sum(i.numel() for i in index))
        for i, part in zip(index, parts):
            out.index_copy_(0, i, part)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *_Gather.apply(grad, *ctx.index))


class Routing:
    """Which samples of a mixed-domain batch go to which domain: one per ``bnctl.domain(model, labels)`` block.

    ``codes`` hold one integer per sample: a position in ``names`` (labels given as names) or an index into
    each layer's :func:`domains` (labels given as a tensor). A layer's :class:`_Split` is computed once per
    block for each device and each way its domains read the codes, shared by layers that read them alike.
    """

    def __init__(self, codes: Tensor, names: list[str] | None, layers: list[tuple[str, nn.Module]],
                 labels_device: bool):
        self.codes, self.names, self.layers = codes, names, layers
        self.size = codes.numel()
        self.labels_device = labels_device  # the labels are a tensor: forwards must run on its device
        self.present: list[int] = torch.unique(codes).tolist()  # (one host synchronization per block)
        self._by_layer: dict[int, tuple[str, ...]] = {}
        self._splits: dict[tuple, _Split] = {}

    @classmethod
    def of(cls, model: nn.Module, labels: object) -> Routing:
        """The routing of ``labels`` over ``model``'s layers with domains; raises on bad labels."""
        if isinstance(labels, Tensor):
            if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex \
                    or labels.dtype is torch.bool:
                raise ValueError(
                    f"bnctl.domain: expected labels as an integer tensor of shape (N,) (indices into "
                    f"bnctl.domains(layer)) or a list of domain names, got a {labels.dtype} tensor of shape "
                    f"{tuple(labels.shape)}. Use labels.long() for class-like float labels, or names."
                )
            routing = cls(labels.detach().long(), None, _layers_with_domains(model), labels_device=True)
            low, high = (min(routing.present), max(routing.present)) if routing.present else (0, 0)
            for lname, layer in routing.layers:
                known = domains(layer)
                if not (0 <= low and high < len(known)):
                    raise ValueError(
                        f"{display_name(lname, layer)}: expected domain indices in [0, {len(known)}) (its domains "
                        f"are {known}), got {low if low < 0 else high}. Index bnctl.domains(layer), or give names."
                    )
            return routing
        if not isinstance(labels, Sequence) or not all(isinstance(v, str) for v in labels):
            raise ValueError(
                "bnctl.domain: expected a domain name, a list of domain names (one per sample) or an integer "
                f"tensor of indices into bnctl.domains(layer), got {type(labels).__name__}."
            )
        names = sorted(set(labels))
        for name in names:
            if name != DEFAULT:
                layers_with(model, name)  # (raises for an unknown name)
        code = {name: i for i, name in enumerate(names)}
        return cls(torch.tensor([code[v] for v in labels], dtype=torch.long), names, _layers_with_domains(model),
                   labels_device=False)

    def _read(self, layer: nn.Module) -> tuple[str, ...]:
        """``layer``'s domain of each code: a named domain it lacks is its default one (as a single-domain
        block reads it); indices are its own domains."""
        read = self._by_layer.get(id(layer))
        if read is None:
            known = domains(layer)
            read = tuple((n if n in known else DEFAULT) for n in self.names) if self.names is not None \
                else tuple(known)
            self._by_layer[id(layer)] = read
        return read

    def describe(self, layer: nn.Module) -> str:
        """``"mixed(a, b)"``: the domains of ``layer`` the labels route samples to."""
        read = self._read(layer)
        routed = {read[c] for c in self.present if c < len(read)}
        return f"mixed({', '.join(d for d in domains(layer) if d in routed)})"

    def split(self, layer: nn.Module, name: str, x: Tensor) -> _Split:
        """``x``'s samples grouped by ``layer``'s domain of each (raising, naming the layer, where the labels
        do not fit ``x``)."""
        if x.shape[0] != self.size:
            raise ValueError(
                f"{name}: expected one domain label per sample, got {self.size} labels for a batch of "
                f"{x.shape[0]}. Pass bnctl.domain the labels of the batch this forward runs on."
            )
        if self.labels_device and self.codes.device != x.device:
            raise ValueError(
                f"{name}: expected the domain labels on the batch's device ({x.device}), got them on "
                f"{self.codes.device}. Pass labels.to(x.device) to bnctl.domain."
            )
        read = self._read(layer)
        key = (read, x.device)
        split = self._splits.get(key)
        if split is None:
            split = self._splits[key] = self._group(read, x.device)
        return split

    def _group(self, read: tuple[str, ...], device: torch.device) -> _Split:
        codes = self.codes.to(device)
        groups: dict[str, list[int]] = {}
        for c in self.present:
            groups.setdefault(read[c], []).append(c)
        if len(groups) == 1:
            return _Split([next(iter(groups))], [self.size])
        found = []
        for domain_name, group in groups.items():
            index = torch.isin(codes, torch.tensor(group, device=device)).nonzero().squeeze(1)
            found.append((int(index[0]), int(index[-1]) + 1, domain_name, index))
        found.sort(key=lambda f: f[0])  # (labels sorted by domain: the parts are consecutive, in order)
        names = [d for *_, d, _ in found]
        if all(stop - start == index.numel() for start, stop, _, index in found):
            return _Split(names, [stop - start for start, stop, *_ in found])
        return _Split(names, [index for *_, index in found])


def layers_with(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` (``(name, layer)``) that have domain ``name``; raises if there are none."""
    layers: list[tuple[str, nn.Module]] = [(n, m) for n, m in batchnorm_layers(model) if name in domains(m)]
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
