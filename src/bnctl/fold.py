"""Conv+BatchNorm folding at every forward, for fine-tuning with frozen statistics.

A BatchNorm layer that normalizes with its running statistics is an affine
map per channel, ``y = c * s + (beta - mu * s)`` with ``s = gamma /
sqrt(sigma2 + eps)``, so the convolution before it can absorb it:
``conv(x, W * s, (b - mu) * s + beta)``. :func:`fold` computes that folded
convolution at every forward from the current parameters, so gradients with
respect to ``W`` (and to ``gamma``, ``beta`` when they learn) are exact, and
only when the layer's current mode normalizes with running statistics and
updates nothing; otherwise the pair runs as conv then BatchNorm, so results
never depend on folding. Modules keep their identity, Parameters, buffers and
state-dict keys: folding sets an instance-level ``forward`` on each conv and
BatchNorm, which ``handle.remove()`` deletes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .frozen import is_frozen_batchnorm
from .modules import _drop_act, layer_plan, layer_state
from .state import LayerTensors

__all__ = ["FoldHandle", "fold"]

logger = logging.getLogger(__name__)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_norm(module: nn.Module) -> bool:
    return (isinstance(module, _BatchNorm) and not hasattr(module, "aux_bn")) or is_frozen_batchnorm(module)


class _LeafTracer(torch.fx.Tracer):
    """fx tracing that stops at convolutions and BatchNorm layers (bnctl's included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _CONVS) or _is_norm(m) or super().is_leaf_module(m, qualname)


def _traced_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where the graph proves the conv's output feeds only that BatchNorm, and each
    of the two is called exactly once."""
    graph = _LeafTracer().trace(module)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _CONVS) or len(node.users) != 1:
            continue
        (user,) = node.users
        if (user.op == "call_module" and _is_norm(modules[user.target]) and user.args[:1] == (node,)
                and len(user.args) == 1 and not user.kwargs and calls[node.target] == calls[user.target] == 1):
            pairs.append((node.target, user.target))
    return pairs


def _sequential_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Adjacent conv then BatchNorm in a plain ``nn.Sequential`` (its forward feeds each output only to
    the next module)."""
    if type(module).forward is not nn.Sequential.forward or not isinstance(module, nn.Sequential):
        return []
    names = list(module._modules)
    return [(a, b) for a, b in zip(names, names[1:])
            if isinstance(module._modules[a], _CONVS) and _is_norm(module._modules[b])]


def _find(module: nn.Module, prefix: str, skipped: list[str]) -> list[tuple[str, str]]:
    """Pairs in ``module``: from its fx graph, else from plain Sequentials, recursing into children."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    try:
        return [(join(a), join(b)) for a, b in _traced_pairs(module)]
    except Exception as err:  # fx cannot trace every model: prove what it can from the parts
        if not isinstance(module, (*_CONVS, _BatchNorm)) and next(module.children(), None) is not None:
            skipped.append(f"{prefix or type(module).__name__}: not traceable by torch.fx "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); looked inside instead")
    pairs = [(join(a), join(b)) for a, b in _sequential_pairs(module)]
    for name, child in module.named_children():
        pairs += _find(child, join(name), skipped)
    return pairs


def _running_tensors(norm: nn.Module) -> LayerTensors | None:
    """What ``norm`` normalizes with in this forward if that is its running statistics and it updates
    nothing (its policy, mode, scopes and selected domain), else ``None``."""
    if is_frozen_batchnorm(norm):
        b = norm._buffers
        return LayerTensors(b["running_mean"], b["running_var"], None, b["weight"], b["bias"])
    state = layer_state(norm)
    step = layer_plan(norm)[norm.training]
    updates = step.update != "none" and not (state is not None and state.no_update)
    if step.normalize != "running" or updates:
        return None
    if state is None:
        return LayerTensors.of(norm)
    if state.replay is not None or state.tapes:  # activation checkpointing records the layer's forwards
        return None
    tensors = state.tensors(norm)
    return tensors.detached_affine() if state.policy.learn_affine is False else tensors


@dataclass
class _Pair:
    """A folded conv and its BatchNorm; ``conv_forward``/``norm_forward`` become their ``forward``.

    Bound methods (not closures), so that ``copy.deepcopy`` and pickling of a folded model give a
    copy whose forwards act on the copied modules.
    """

    conv: nn.Module
    norm: nn.Module
    folded: int | None = None  # id() of the folded conv's output, until the norm takes it
    outputs: int = 0  # elements of the conv's last output

    def worth_it(self) -> bool:
        """Whether folding saves work: scaling the weight (and its gradient) costs passes over the
        weight, the BatchNorm it replaces passes over the activations. Both are exact, so this only
        chooses the faster one (from the last forward's output size; the first forward folds)."""
        return self.conv.weight.numel() <= self.outputs or not self.outputs

    def conv_forward(self, input: Tensor) -> Tensor:
        conv, norm = self.conv, self.norm
        t = _running_tensors(norm) if self.worth_it() else None
        if t is None:
            self.folded = None
            out = type(conv).forward(conv, input)
            self.outputs = out.numel()
            return out
        scale = torch.rsqrt(t.running_var + norm.eps)
        if t.weight is not None:
            scale = t.weight * scale
        shift = -t.running_mean * scale if conv.bias is None else (conv.bias - t.running_mean) * scale
        if t.bias is not None:
            shift = shift + t.bias
        weight = conv.weight * scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1)).to(conv.weight.dtype)
        out = conv._conv_forward(input, weight, shift.to(conv.weight.dtype))
        self.folded, self.outputs = id(out), out.numel()
        return out

    def norm_forward(self, input: Tensor) -> Tensor:
        if self.folded is not None and self.folded == id(input):
            self.folded = None
            return _drop_act(self.norm, input)  # already normalized by the conv; timm's drop and act still run
        return type(self.norm).forward(self.norm, input)


@dataclass
class FoldHandle:
    """What :func:`fold` did: ``pairs`` (``(conv_name, bn_name)``), ``skipped`` (notes on the parts of
    the model it could not analyse); ``remove()`` restores the modules exactly."""

    pairs: list[tuple[str, str]]
    skipped: list[str] = field(default_factory=list)
    _modules: list[nn.Module] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Give every conv and BatchNorm back its class's forward (idempotent)."""
        for module in self._modules:
            module.__dict__.pop("forward", None)
        self._modules = []

    def __enter__(self) -> FoldHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def fold(model: nn.Module) -> FoldHandle:
    """Fold each BatchNorm into the convolution before it, whenever the BatchNorm normalizes with
    running statistics and updates nothing (see the module docstring).

    Finds every ``Conv1d/2d/3d`` whose output feeds only a BatchNorm layer
    (``nn.BatchNorm*d``, bnctl's, timm's ``BatchNormAct2d`` — its dropout and
    activation still run — or a buffers-only ``FrozenBatchNorm2d``), proved
    from the model's ``torch.fx`` graph; parts fx cannot trace are analysed
    through their plain ``nn.Sequential`` containers and traceable children,
    and listed in ``handle.skipped``. Layers in train() under the ``torch``
    preset (batch statistics) or updating their statistics
    (``running_update``) run unfolded, so their updates see the conv's output.
    A pair whose conv weight has more elements than its output (deep layers
    of small inputs) also runs unfolded: scaling that weight at every forward
    would cost more than the BatchNorm pass it saves.

    Args:
        model: the model (in any mode; the decision is made at every forward).

    Returns:
        A :class:`FoldHandle`; ``handle.remove()`` (or leaving ``with bnctl.fold(model):``) restores.

    Raises:
        ValueError: a conv or BatchNorm of ``model`` is already folded.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> expected = model(x)
        >>> with fold(model) as handle:
        ...     print(handle.pairs, torch.allclose(model(x), expected, atol=1e-6))
        [('0', '1')] True
    """
    skipped: list[str] = []
    pairs = _find(model, "", skipped)
    modules = dict(model.named_modules())
    already = [name for pair in pairs for name in pair if "forward" in modules[name].__dict__]
    if already:
        raise ValueError(f"{already[0]}: expected a module without an instance-level forward, got one (already "
                         "folded?). Remove the earlier fold handle first.")
    handle = FoldHandle(pairs, skipped)
    for conv_name, norm_name in pairs:
        pair = _Pair(modules[conv_name], modules[norm_name])
        pair.conv.forward = pair.conv_forward
        pair.norm.forward = pair.norm_forward
        handle._modules += [pair.conv, pair.norm]
    for note in skipped:
        logger.info("bnctl.fold: %s", note)
    return handle
