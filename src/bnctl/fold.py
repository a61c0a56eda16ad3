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
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from . import context
from .frozen import is_frozen_batchnorm
from .modules import drop_act, is_uninitialized, layer_state, normalizes_only
from .state import LayerState, LayerTensors

__all__ = ["FoldHandle", "fold", "unfold"]

logger = logging.getLogger(__name__)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_conv(module: nn.Module) -> bool:
    """A torch convolution of exactly a stock class (a subclass may compute something else)."""
    return type(module) in _CONVS


def _is_norm(module: nn.Module) -> bool:
    """A BatchNorm whose forward bnctl knows to be plain normalization (then timm's drop and act)."""
    return is_frozen_batchnorm(module) or normalizes_only(module)


class _LeafTracer(torch.fx.Tracer):
    """fx tracing that stops at convolutions and BatchNorm layers (bnctl's included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_CONVS, _BatchNorm)) or is_frozen_batchnorm(m) or super().is_leaf_module(m, qualname)


def _graph_pairs(module: nn.Module) -> set[tuple[str, str]]:
    """``(conv, bn)`` names where the graph proves the conv's output feeds only that BatchNorm, and each
    of the two is called exactly once."""
    graph = _LeafTracer().trace(module)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    modules = dict(module.named_modules())
    pairs = set()
    for node in graph.nodes:
        if node.op != "call_module" or not _is_conv(modules[node.target]) or len(node.users) != 1:
            continue
        (user,) = node.users
        if (user.op == "call_module" and _is_norm(modules[user.target]) and user.args == (node,)
                and not user.kwargs and calls[node.target] == calls[user.target] == 1):
            pairs.add((node.target, user.target))
    return pairs


def _traced_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """:func:`_graph_pairs` in both train() and eval() (a forward may branch on the mode): the pairs
    proved in both, in graph order. Every module's mode is restored."""
    modes = {m: m.training for m in module.modules()}
    try:
        found = [_graph_pairs(module.train(mode)) for mode in (True, False)]
    finally:
        for m, mode in modes.items():
            m.training = mode
    order = [n for n, _ in module.named_modules()]
    return sorted(found[0] & found[1], key=lambda pair: order.index(pair[0]))


def _sequential_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Adjacent conv then BatchNorm in a plain ``nn.Sequential`` (its forward feeds each output only to
    the next module)."""
    if type(module).forward is not nn.Sequential.forward or not isinstance(module, nn.Sequential):
        return []
    names = list(module._modules)
    return [(a, b) for a, b in zip(names, names[1:]) if _is_conv(module._modules[a]) and _is_norm(module._modules[b])]


def _find(module: nn.Module, prefix: str, skipped: list[str]) -> list[tuple[str, str, str]]:
    """``(scope, conv, bn)``: pairs proved in ``module``'s fx graph (scope: ``module``), else in its plain
    Sequentials (scope: that Sequential), recursing into children."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    try:
        return [(prefix, join(a), join(b)) for a, b in _traced_pairs(module)]
    except Exception as err:  # fx cannot trace every model: prove what it can from the parts
        if not isinstance(module, (*_CONVS, _BatchNorm)) and next(module.children(), None) is not None:
            skipped.append(f"{prefix or type(module).__name__}: not traceable by torch.fx "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); looked inside instead")
    pairs = [(prefix, join(a), join(b)) for a, b in _sequential_pairs(module)]
    for name, child in module.named_children():
        pairs += _find(child, join(name), skipped)
    return pairs


def _affine_tensors(norm: nn.Module, plain: LayerState) -> LayerTensors | None:
    """The tensors of ``norm``'s per-channel affine map in this forward, if it is one (it normalizes with
    running statistics and updates nothing: :attr:`bnctl.state.Forward.folds`), else ``None``.

    The layer's own decision (:meth:`bnctl.state.LayerState.decide`) says so, with the same errors
    as the unfolded forward; ``plain`` decides for a torch layer bnctl does not control.
    """
    if is_frozen_batchnorm(norm):
        b = norm._buffers
        return LayerTensors(b["running_mean"], b["running_var"], None, b["weight"], b["bias"])
    if is_uninitialized(norm):
        return None
    forward = (layer_state(norm) or plain).decide(norm, None, context.current())
    if not forward.folds:
        return None
    tensors = LayerTensors.of(norm, forward.domain)
    return tensors.detached_affine() if forward.detach_affine else tensors


class _Scope:
    """Counts the running forwards of the module that proved its pairs: a pair folds only inside one
    (a conv called on its own, or through a slice of a Sequential, runs plain). Its methods are that
    module's forward hooks."""

    def __init__(self) -> None:
        self.active = 0
        self.pairs: list[_Pair] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        self.active += 1

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.active -= 1
        if not self.active:  # (also after an exception: the hook is always called) hold no activation
            for pair in self.pairs:
                pair.folded = None


@dataclass
class _Pair:
    """A folded conv and its BatchNorm; ``conv_forward``/``norm_forward`` become their ``forward``.

    Bound methods (not closures), so that ``copy.deepcopy`` and pickling of a folded model give a
    copy whose forwards act on the copied modules.
    """

    conv: nn.Module
    norm: nn.Module
    scope: _Scope
    plain: LayerState  # decides for the BatchNorm while bnctl does not control it (the torch preset)
    folded: Tensor | None = None  # the folded conv's output, until the norm takes it

    def __getstate__(self) -> dict:
        return {**self.__dict__, "folded": None}  # (copies and pickles carry no activation)

    def worth_it(self, input: Tensor) -> bool:
        """Whether folding saves work: scaling the weight (and its gradient) costs passes over the
        weight, the BatchNorm it replaces passes over the activations (about ``input.numel()`` scaled
        by the channel ratio and the stride). Both are exact; this only picks the faster, from the
        input's shape alone (so an activation checkpoint's recomputation decides alike)."""
        conv = self.conv
        outputs = input.numel() // max(conv.in_channels, 1) * conv.out_channels
        for stride in conv.stride:
            outputs //= stride
        return conv.weight.numel() <= outputs

    def _hooked(self) -> bool:
        """Hooks would see (or change) the tensor between conv and BatchNorm: fold only without them."""
        return bool(self.conv._forward_hooks or self.norm._forward_pre_hooks or _global_forward_hooks
                    or _global_forward_pre_hooks)

    def conv_forward(self, input: Tensor) -> Tensor:
        conv, norm = self.conv, self.norm
        foldable = self.scope.active > 0 and self.worth_it(input) and not self._hooked()
        t = _affine_tensors(norm, self.plain) if foldable else None
        if t is None:
            self.folded = None
            return type(conv).forward(conv, input)
        scale = torch.rsqrt(t.running_var + norm.eps)
        if t.weight is not None:
            scale = t.weight * scale
        shift = -t.running_mean * scale if conv.bias is None else (conv.bias - t.running_mean) * scale
        if t.bias is not None:
            shift = shift + t.bias
        weight = conv.weight * scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1)).to(conv.weight.dtype)
        out = conv._conv_forward(input, weight, shift.to(conv.weight.dtype))
        self.folded = out  # (the tensor, not its id(): older dynamo cannot trace id() of an intermediate)
        return out

    def norm_forward(self, input: Tensor) -> Tensor:
        if self.folded is not None and self.folded is input and self.scope.active > 0:
            self.folded = None
            return drop_act(self.norm, input)  # already normalized by the conv; timm's drop and act still run
        self.folded = None
        return type(self.norm).forward(self.norm, input)


def _unfold_modules(modules: list[nn.Module]) -> None:
    for module in modules:
        if isinstance(getattr(module.__dict__.get("forward"), "__self__", None), _Pair):
            del module.__dict__["forward"]
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), _Scope)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)


@dataclass
class FoldHandle:
    """What :func:`fold` did: ``pairs`` (``(conv_name, bn_name)``), ``skipped`` (notes on the parts of
    the model it could not analyse); ``remove()`` restores the modules exactly."""

    pairs: list[tuple[str, str]]
    skipped: list[str] = field(default_factory=list)
    _modules: list[nn.Module] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Give every conv and BatchNorm back its class's forward and drop the scope hooks (idempotent)."""
        _unfold_modules(self._modules)
        self._modules = []

    def __enter__(self) -> FoldHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def unfold(model: nn.Module) -> None:
    """Undo every fold in ``model``, also in a copy or an unpickled model that has no handle."""
    _unfold_modules(list(model.modules()))


def fold(model: nn.Module) -> FoldHandle:
    """Fold each BatchNorm into the convolution before it, whenever the BatchNorm normalizes with
    running statistics and updates nothing (see the module docstring).

    Finds every ``Conv1d/2d/3d`` (of exactly those classes) whose output
    feeds only a BatchNorm layer (``nn.BatchNorm*d``, bnctl's, timm's
    ``BatchNormAct2d`` — its dropout and activation still run — or a
    buffers-only ``FrozenBatchNorm2d``), proved from the model's
    ``torch.fx`` graph in both train() and eval(); parts fx cannot trace are
    analysed through their plain ``nn.Sequential`` containers and traceable
    children, and listed in ``handle.skipped``. A pair folds only while the
    module that proved it runs (a conv called alone, or through a slice of
    a Sequential, runs plain), without hooks between the two, and:

    * when the BatchNorm normalizes with running statistics and updates
      nothing: in train() under the ``torch`` preset (batch statistics) or
      while updating (``running_update``) the pair runs unfolded, so updates
      see the conv's output;
    * when its conv weight has no more elements than its output: scaling a
      larger weight at every forward would cost more than the BatchNorm pass.

    Args:
        model: the model (in any mode; the decision is made at every forward).

    Returns:
        A :class:`FoldHandle`; ``handle.remove()`` (or leaving ``with bnctl.fold(model):``) restores.
        A copy or pickle of a folded model stays folded: :func:`unfold` undoes that.

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
    found = _find(model, "", skipped)
    modules = dict(model.named_modules())
    already = [name for _, *pair in found for name in pair if "forward" in modules[name].__dict__]
    if already:
        raise ValueError(f"{already[0]}: expected a module without an instance-level forward, got one (already "
                         "folded: remove that fold's handle, or call bnctl.unfold(model) on a copy).")
    handle = FoldHandle([(conv, norm) for _, conv, norm in found], skipped)
    scopes: dict[str, _Scope] = {}
    for prefix, conv_name, norm_name in found:
        scope = scopes.get(prefix)
        if scope is None:
            scope = scopes[prefix] = _Scope()
            owner = modules[prefix]
            owner.register_forward_pre_hook(scope.enter)
            owner.register_forward_hook(scope.leave, always_call=True)
            handle._modules.append(owner)
        norm = modules[norm_name]
        pair = _Pair(modules[conv_name], norm, scope, LayerState(norm_name, type(norm), {}))
        scope.pairs.append(pair)
        pair.conv.forward = pair.conv_forward
        pair.norm.forward = pair.norm_forward
        handle._modules += [pair.conv, pair.norm]
    for note in skipped:
        logger.info("bnctl.fold: %s", note)
    return handle
