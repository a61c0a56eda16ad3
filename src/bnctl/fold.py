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

Whatever PyTorch lets a user reach (hooks, modules swapped after folding,
threads, activation checkpointing, nested calls), a call that could not be
exact folded runs unfolded, and ``handle.pairs`` says why. The folded output
travels from the conv to its BatchNorm in a frame of the running forward of
the module that proved the pair, kept per thread: no module holds per-call
state. Where the BatchNorm's affine learns, the folded weight ``W * s`` is
recomputed in backward instead of being kept (:class:`_FoldedConv`), so a
folded pair keeps nothing for backward that the unfolded conv does not.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

from . import context
from .ecosystem import drop_act, is_frozen_batchnorm, normalizes_only
from .modules import is_uninitialized, layer_state
from .policy import MIXED, RUNNING
from .state import LayerState, LayerTensors

__all__ = ["PREFER", "FoldHandle", "FoldPair", "fold", "unfold"]

logger = logging.getLogger(__name__)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PREFER = ("memory", "time")
"""What :func:`fold` optimizes where memory and time disagree (``prefer=``)."""


def _is_conv(module: nn.Module) -> bool:
    """A torch convolution of exactly a stock class (a subclass may compute something else)."""
    return type(module) in _CONVS


def _is_norm(module: nn.Module) -> bool:
    """A BatchNorm whose forward bnctl knows to be plain normalization (then timm's drop and act)."""
    return is_frozen_batchnorm(module) or normalizes_only(module)


# -- finding the pairs ------------------------------------------------------------------------


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


def _holds_pairs(module: nn.Module) -> bool:
    """Whether ``module`` has both a convolution and a BatchNorm below it (else there is nothing to prove)."""
    below = list(module.modules())[1:]
    return any(map(_is_conv, below)) and any(map(_is_norm, below))


@dataclass
class _Found:
    """A pair and the module whose forward proves it (its scope), with their qualified names."""

    scope_name: str
    scope: nn.Module
    conv_name: str
    conv: _ConvNd
    norm_name: str
    norm: nn.Module


def _find(module: nn.Module, prefix: str) -> tuple[list[_Found], list[str]]:
    """The pairs below ``module``, each proved by the deepest module whose forward proves it (its fx graph,
    or a plain Sequential's order), and notes on the modules fx cannot trace that no module above proves
    anything for. Deepest, so that a block re-run on its own (an activation checkpoint's recomputation,
    a direct call) folds as it did inside the whole model."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    found: list[_Found] = []
    notes: list[str] = []
    for name, child in module.named_children():
        pairs, child_notes = _find(child, join(name))
        found += pairs
        notes += child_notes
    if isinstance(module, (*_CONVS, _BatchNorm)) or not _holds_pairs(module):
        return found, notes
    try:
        own = _traced_pairs(module)
        notes = []  # this module's graph proves what its children's could not
    except Exception as err:  # fx cannot trace every model: prove what it can from the parts
        notes.append(f"{prefix or type(module).__name__}: not traceable by torch.fx "
                     f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); looked inside instead")
        own = _sequential_pairs(module)
    known = {(id(f.conv), id(f.norm)) for f in found}
    modules = dict(module.named_modules())
    for a, b in own:
        conv, norm = cast(_ConvNd, modules[a]), modules[b]  # (_is_conv proved it)
        if (id(conv), id(norm)) not in known:
            found.append(_Found(prefix, module, join(a), conv, join(b), norm))
    return found, notes


def _unshared(found: list[_Found]) -> tuple[list[_Found], list[str]]:
    """Drop the pairs whose conv or BatchNorm is in another pair too (a module used in two places: one
    instance-level forward cannot serve both); the same pair reached through two paths counts once."""
    kept: dict[tuple[int, int, int], _Found] = {}
    for f in found:
        kept.setdefault((id(f.scope), id(f.conv), id(f.norm)), f)
    uses = Counter(id(m) for f in kept.values() for m in (f.conv, f.norm))
    pairs, notes = [], []
    for f in kept.values():
        if uses[id(f.conv)] == 1 and uses[id(f.norm)] == 1:
            pairs.append(f)
            continue
        shared = f.conv_name if uses[id(f.conv)] > 1 else f.norm_name
        notes.append(f"{f.conv_name} -> {f.norm_name}: not folded, {shared} is used in another place too (a shared "
                     "module): fold cannot prove what its output feeds")
    return pairs, notes


def _path(scope: nn.Module, name: str) -> tuple[tuple[nn.Module, str, nn.Module], ...]:
    """The links ``(parent, attribute, child)`` from ``scope`` down to its submodule ``name``."""
    links: list[tuple[nn.Module, str, nn.Module]] = []
    parent = scope
    for part in name.split(".") if name else ():
        child = cast(nn.Module, parent._modules[part])  # (a name of named_modules(): not None)
        links.append((parent, part, child))
        parent = child
    return tuple(links)


# -- per call ---------------------------------------------------------------------------------


def _saved_hooks(ctx: int) -> Any:
    """The innermost saved-tensor hooks (an activation checkpoint installs its own), to compare by identity."""
    if ctx & context.COMPILING:  # (compilers handle checkpoints themselves)
        return None
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if hooks is None else hooks[0]


class _Scope:
    """The module whose forward proves its pairs: a pair folds only inside one of its running forwards
    (a conv called on its own, or through a slice of a Sequential, runs plain). Its methods are that
    module's forward hooks.

    Each running forward has a frame, on a stack per thread: the saved-tensor hooks active when it
    began, then a slot per pair for the folded conv output until its BatchNorm takes it. So threads,
    nested calls and recomputations never see each other's tensors, and nothing outlives the forward.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.pairs: list[_Pair] = []
        self._local = threading.local()

    def frames(self) -> list[list[Any]]:
        frames = getattr(self._local, "frames", None)
        if frames is None:
            frames = self._local.frames = []
        return frames

    def enter(self, module: nn.Module, args: Any) -> None:
        self.frames().append([_saved_hooks(context.current())] + [None] * len(self.pairs))

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.frames().pop()  # (also after an exception: the hook is always called) hold no activation

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}  # (copies start with no frame)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


_REASONS = {
    "folded": "",
    "not run": "not run since folding",
    "outside": "{conv} ran outside {scope}, the module whose forward proves the pair",
    "saved hooks": "saved-tensor hooks (an activation checkpoint) began inside {scope}: a recomputation "
                   "would not fold alike",
    "hook": "{0} must see the output of {conv}",
    "replaced": "{bn} was replaced since folding (now {0}): fold the model again",
    "unbatched": "{conv} got an unbatched input",
    "mode": "{bn} {0}",
    "time": "faster unfolded: the weight of {conv} ({0} values) outweighs its output ({1} values)",
}


@dataclass
class _Pair:
    """A folded conv and its BatchNorm; ``conv_forward``/``norm_forward`` become their ``forward``.

    Bound methods (not closures), so that ``copy.deepcopy`` and pickling of a folded model give a
    copy whose forwards act on the copied modules. ``status``: what the last forward did, and why
    (a key of ``_REASONS`` and its arguments), for :class:`FoldPair` to read.
    """

    conv: _ConvNd
    norm: nn.Module  # a BatchNorm (_BatchNorm) or a buffers-only one (is_frozen_batchnorm)
    scope: _Scope
    slot: int  # the pair's place in its scope's frames
    names: tuple[str, str]
    path: tuple[tuple[nn.Module, str, nn.Module], ...]  # from the scope's module to the BatchNorm
    plain: LayerState  # decides for the BatchNorm while bnctl does not control it (the torch preset)
    memory: bool  # prefer="memory"
    status: tuple = ("not run",)

    def reason(self) -> str | None:
        key, *args = self.status
        if key == "folded":
            return None
        return _REASONS[key].format(*args, conv=self.names[0], bn=self.names[1], scope=self.scope.name or "the model")

    def worth_it(self, input: Tensor) -> tuple[int, int] | None:
        """``None`` where folding saves time, else the weight's and the output's sizes: scaling the weight
        (and its gradient) costs passes over the weight, the BatchNorm it replaces passes over the
        activations (about ``input.numel()`` scaled by the channel ratio and the stride). From the
        input's shape alone, so an activation checkpoint's recomputation decides alike."""
        conv = self.conv
        outputs = input.numel() // max(conv.in_channels, 1) * conv.out_channels
        for stride in conv.stride:
            outputs //= stride
        weights = conv.weight.numel()
        return None if weights <= outputs else (weights, outputs)

    def _hook(self) -> str | None:
        """A hook that would see (or change) the tensor between conv and BatchNorm, or their gradients."""
        conv, norm = self.conv, self.norm
        if conv._forward_hooks:
            return f"a forward hook on {self.names[0]}"
        if conv._backward_hooks or conv._backward_pre_hooks:
            return f"a backward hook on {self.names[0]}"
        if norm._forward_pre_hooks or norm._forward_hooks:
            return f"a forward hook on {self.names[1]}"
        if norm._backward_hooks or norm._backward_pre_hooks:
            return f"a backward hook on {self.names[1]}"
        if _global_forward_hooks or _global_forward_pre_hooks or _global_backward_hooks or _global_backward_pre_hooks:
            return "a global module hook (torch.nn.modules.module.register_module_*_hook)"
        return None

    def conv_forward(self, input: Tensor) -> Tensor:
        conv = self.conv
        ctx = context.current()
        frames = self.scope.frames()
        status = self._blocked(input, frames, ctx)
        t = None
        if status is None:
            t, mode = _affine_tensors(self.norm, self.plain, ctx)
            if t is None:
                status = ("mode", mode)
            else:
                sizes = self.worth_it(input)
                learns = t.weight is not None and t.weight.requires_grad or t.bias is not None and t.bias.requires_grad
                if sizes is not None and not (self.memory and learns and torch.is_grad_enabled()):
                    status = ("time", *sizes)
        if not ctx & context.COMPILING:  # (a compiled graph would replay a constant)
            self.status = status or ("folded",)
        if status is not None:
            return type(conv).forward(conv, input)
        out = self._folded(input, t, ctx)  # type: ignore[arg-type]  # (status is None: t was found)
        frames[-1][self.slot] = out  # (the tensor, not its id(): older dynamo cannot trace id() of an intermediate)
        return out

    def _blocked(self, input: Tensor, frames: list[list[Any]], ctx: int) -> tuple | None:
        """Why this call cannot fold whatever the BatchNorm's mode (``None``: it can)."""
        if not frames:
            return ("outside",)
        if frames[-1][0] is not _saved_hooks(ctx):
            return ("saved hooks",)
        hook = self._hook()
        if hook is not None:
            return ("hook", hook)
        for parent, name, child in self.path:
            if parent._modules.get(name) is not child:
                now = parent._modules.get(name)
                return ("replaced", "nothing" if now is None else type(now).__name__)
        if input.dim() != self.conv.weight.dim():
            return ("unbatched",)
        return None

    def _folded(self, input: Tensor, t: LayerTensors, ctx: int) -> Tensor:
        """``conv(input, W * s, (b - mu) * s + beta)``; where memory is preferred and backward will run,
        through :class:`_FoldedConv`, which recomputes ``W * s`` in backward instead of keeping it. (The
        shift is written so that autograd keeps the parameters and buffers themselves, not new tensors.)"""
        conv, norm = self.conv, self.norm
        mean: Tensor = t.running_mean  # type: ignore[assignment]  # t folds: running statistics exist
        var: Tensor = t.running_var  # type: ignore[assignment]  # (Forward.folds)
        scale = torch.rsqrt(var + norm.eps)  # type: ignore[operator]  # norm.eps: a float (a BatchNorm's)
        if t.weight is not None:
            scale = t.weight * scale
        shift = -(mean * scale) if conv.bias is None else conv.bias * scale - mean * scale
        if t.bias is not None:
            shift = shift + t.bias
        weight = conv.weight
        if (self.memory and not ctx and torch.is_grad_enabled()
                and (input.requires_grad or weight.requires_grad or scale.requires_grad or shift.requires_grad)):
            return _folded_conv(conv, input, scale, shift.to(weight.dtype))
        weight = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1)).to(weight.dtype)
        return conv._conv_forward(input, weight, shift.to(weight.dtype))

    def norm_forward(self, input: Tensor) -> Tensor:
        frames = self.scope.frames()
        if frames:
            frame = frames[-1]
            out = frame[self.slot]
            if out is not None:
                frame[self.slot] = None
                if out is not input:
                    raise RuntimeError(
                        f"{self.names[1]}: expected the output of {self.names[0]} (folded), got another tensor: "
                        "the forward of the model changed since bnctl.fold proved the pair. Remove the fold "
                        "(handle.remove() or bnctl.unfold(model)) and fold again.")
                return drop_act(self.norm, input)  # already normalized by the conv; timm's drop and act still run
        return type(self.norm).forward(self.norm, input)


def _affine_tensors(norm: nn.Module, plain: LayerState, ctx: int) -> tuple[LayerTensors | None, str]:
    """The tensors of ``norm``'s per-channel affine map in this forward, if it is one (it normalizes with
    running statistics and updates nothing: :attr:`bnctl.state.Forward.folds`), else ``None`` and why.

    The layer's own decision (:meth:`bnctl.state.LayerState.decide`) says so, with the same errors
    as the unfolded forward; ``plain`` decides for a torch layer bnctl does not control.
    """
    if is_frozen_batchnorm(norm):
        b = norm._buffers
        return LayerTensors(b["running_mean"], b["running_var"], None, b["weight"], b["bias"]), ""
    if is_uninitialized(norm):
        return None, "is a lazy layer not yet materialized"
    # not buffers-only, so a _BatchNorm (fold pairs only those and buffers-only ones: _is_norm)
    forward = (layer_state(norm) or plain).decide(norm, None, ctx)  # type: ignore[arg-type]
    if not forward.folds:
        if forward.taped:
            return None, "is recorded by an activation checkpoint (bnctl.checkpoint_context)"
        if forward.normalize == MIXED:
            return None, "normalizes a mixed-domain batch (bnctl.domain with one label per sample)"
        if forward.normalize != RUNNING:
            return None, f"normalizes with batch statistics in {'train' if norm.training else 'eval'}()"
        return None, f"updates its running statistics in {'train' if norm.training else 'eval'}()"
    tensors = LayerTensors.of(norm, forward.domain)
    return (tensors.detached_affine() if forward.detach_affine else tensors), ""


# -- the folded convolution that keeps no folded weight ---------------------------------------


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((-1,) + (1,) * (ndim - 1))


def _folded_conv(conv: _ConvNd, input: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``conv(input, W * scale, shift)`` through :class:`_FoldedConv`: ``conv``'s padding applied as
    its ``_conv_forward`` does, and autocast's cast done here (the function sees no autocast)."""
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        if padding != "valid":
            input = torch.nn.functional.pad(input, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.stride)
    device = input.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is not None:
        input, shift = input.to(dtype), shift.to(dtype)
    return _FoldedConv.apply(input, conv.weight, scale, shift, conv.stride, padding, conv.dilation, conv.groups,
                             dtype)


class _FoldedConv(torch.autograd.Function):
    """``y = conv(x, W * s, shift)`` that keeps ``x``, ``W`` and the per-channel ``s`` for backward (what
    the unfolded conv keeps, and ``s``) and recomputes ``W * s`` there, instead of keeping it.

    Backward, with ``(gx, gWs, gshift)`` the convolution's gradients for the weight ``W * s``:
    ``dx = gx``, ``dW = gWs * s``, ``ds = sum(gWs * W)`` over all but the output channel, ``dshift = gshift``.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: tuple, padding: tuple,
                dilation: tuple, groups: int, dtype: torch.dtype | None) -> Tensor:
        folded = weight * _channel_view(scale, weight.dim()).to(weight.dtype)
        if dtype is not None:
            folded = folded.to(dtype)
        return torch.convolution(x, folded, shift, stride, padding, dilation, False, (0,) * len(stride), groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, scale, _shift, stride, padding, dilation, groups, dtype = inputs
        ctx.save_for_backward(x, weight, scale)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.dtype = dtype

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, scale = ctx.saved_tensors
        need_x, need_w, need_s, need_shift = ctx.needs_input_grad[:4]
        stride, padding, dilation, groups = ctx.conv
        view = _channel_view(scale, weight.dim()).to(weight.dtype)
        folded = weight * view
        if ctx.dtype is not None:
            folded = folded.to(ctx.dtype)
        gx, gw, gshift = torch.ops.aten.convolution_backward(
            grad, x, folded, [folded.shape[0]] if need_shift else None, stride, padding, dilation, False,
            [0] * len(stride), groups, [need_x, need_w or need_s, need_shift])
        grad_w = grad_s = None
        if need_w or need_s:
            gw = gw.to(weight.dtype)
            if need_w:
                grad_w = gw * view
            if need_s:
                grad_s = (gw * weight).sum(tuple(range(1, weight.dim()))).to(scale.dtype)
        return gx, grad_w, grad_s, gshift, None, None, None, None, None


# -- the handle -------------------------------------------------------------------------------


class FoldPair(tuple):
    """``(conv_name, bn_name)``, a plain 2-tuple, with what the pair did at its last forward.

    ``folded``: whether it folded (``None`` before its first forward); ``reason``: why not, in one line
    (``None`` when it folded). Read from the model as it is now: a copy of a folded model has pairs
    of its own.
    """

    _pair: _Pair | None

    def __new__(cls, conv: str, bn: str, pair: _Pair | None = None) -> FoldPair:
        self = super().__new__(cls, (conv, bn))
        self._pair = pair
        return self

    def __reduce__(self) -> tuple:
        return (FoldPair, (self[0], self[1], self._pair))

    @property
    def conv(self) -> str:
        return self[0]

    @property
    def bn(self) -> str:
        return self[1]

    @property
    def folded(self) -> bool | None:
        if self._pair is None or self._pair.status[0] == "not run":
            return None
        return self._pair.status[0] == "folded"

    @property
    def reason(self) -> str | None:
        return None if self._pair is None else self._pair.reason()


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
    """What :func:`fold` did: ``pairs`` (:class:`FoldPair`: ``(conv_name, bn_name)``, with whether each
    folded at its last forward and why not), ``skipped`` (notes on the parts of the model it could not
    analyse, and pairs it could not fold at all); ``remove()`` restores the modules exactly."""

    pairs: list[FoldPair]
    skipped: list[str] = field(default_factory=list)
    prefer: str = "memory"
    _modules: list[nn.Module] = field(default_factory=list, repr=False)

    def unfolded(self) -> dict[tuple[str, str], str]:
        """``{(conv_name, bn_name): reason}`` for each pair that did not fold at its last forward (or has
        not run yet), the reason in one line."""
        return {(p[0], p[1]): p.reason for p in self.pairs if p.reason is not None}

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


def fold(model: nn.Module, *, prefer: str = "memory") -> FoldHandle:
    """Fold each BatchNorm into the convolution before it, whenever the BatchNorm normalizes with
    running statistics and updates nothing (see the module docstring).

    Finds every ``Conv1d/2d/3d`` (of exactly those classes) whose output
    feeds only a BatchNorm layer (``nn.BatchNorm*d``, bnctl's, timm's
    ``BatchNormAct2d`` — its dropout and activation still run — or a
    buffers-only ``FrozenBatchNorm2d``), proved from the ``torch.fx`` graph,
    in both train() and eval(), of the deepest module whose forward calls
    both; parts fx cannot trace are analysed through their plain
    ``nn.Sequential`` containers and traceable children, and listed in
    ``handle.skipped``, as are pairs whose conv or BatchNorm is used in
    another place too. A pair folds in a call only where folding is exact:

    * inside a running forward of the module that proved it (a conv called
      alone, or through a slice of a Sequential, runs plain), with no
      saved-tensor hooks (an activation checkpoint) begun inside it since;
    * without hooks on the conv or the BatchNorm, or global module hooks,
      that would see the tensor between them or its gradient;
    * while the BatchNorm is still where it was when folded (a layer swapped
      in since, e.g. by ``nn.SyncBatchNorm.convert_sync_batchnorm``, runs
      unfolded after a plain conv);
    * when the BatchNorm normalizes with running statistics and updates
      nothing: in train() under the ``torch`` preset (batch statistics) or
      while updating (``running_update``) the pair runs unfolded, so updates
      see the conv's output;
    * where it pays: with ``prefer="time"``, or without gradients, or when
      the BatchNorm's affine is frozen (then folding saves no memory), when
      its conv weight has no more elements than its output (scaling a larger
      weight at every forward costs more than the BatchNorm pass); with
      ``prefer="memory"`` a pair whose BatchNorm affine learns also folds
      otherwise, since the unfolded BatchNorm would keep its whole input for
      backward.

    With ``prefer="memory"`` a folded conv keeps ``W`` and the per-channel
    ``s`` for backward and recomputes ``W * s`` there (one more pass over the
    weight), so folding never keeps a weight-sized tensor more than the
    unfolded model; with ``prefer="time"`` it keeps ``W * s``.

    Each :class:`FoldPair` in ``handle.pairs`` says whether it folded at its
    last forward, and why not.

    Args:
        model: the model (in any mode; the decision is made at every forward).
        prefer: ``"memory"`` (default) or ``"time"``, where the two disagree (see above).

    Returns:
        A :class:`FoldHandle`; ``handle.remove()`` (or leaving ``with bnctl.fold(model):``) restores.
        A copy or pickle of a folded model stays folded: :func:`unfold` undoes that.

    Raises:
        ValueError: a conv or BatchNorm of ``model`` is already folded, or ``prefer`` is neither value.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> expected = model(x)
        >>> with fold(model) as handle:
        ...     print(handle.pairs, torch.allclose(model(x), expected, atol=1e-6), handle.pairs[0].folded)
        [('0', '1')] True True
    """
    if prefer not in PREFER:
        raise ValueError(f"fold: expected prefer to be one of {list(PREFER)}, got {prefer!r}.")
    found, notes = _find(model, "")
    found, shared = _unshared(found)
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    found.sort(key=lambda f: order[id(f.conv)])
    skipped = notes + shared
    already = [name for f in found for name, m in ((f.conv_name, f.conv), (f.norm_name, f.norm))
               if "forward" in m.__dict__]
    if already:
        raise ValueError(f"{already[0]}: expected a module without an instance-level forward, got one (already "
                         "folded: remove that fold's handle, or call bnctl.unfold(model) on a copy).")
    handle = FoldHandle([], skipped, prefer)
    scopes: dict[int, _Scope] = {}
    for f in found:
        scope = scopes.get(id(f.scope))
        if scope is None:
            scope = scopes[id(f.scope)] = _Scope(f.scope_name)
            f.scope.register_forward_pre_hook(scope.enter)
            f.scope.register_forward_hook(scope.leave, always_call=True)
            handle._modules.append(f.scope)
        relative = f.norm_name[len(f.scope_name) + 1:] if f.scope_name else f.norm_name
        pair = _Pair(f.conv, f.norm, scope, len(scope.pairs) + 1, (f.conv_name, f.norm_name),
                     _path(f.scope, relative), LayerState(f.norm_name, cast("type[_BatchNorm]", type(f.norm)), {}),
                     prefer == "memory")  # (the plain state decides for a torch BatchNorm only: _affine_tensors)
        scope.pairs.append(pair)
        pair.conv.forward = pair.conv_forward
        pair.norm.forward = pair.norm_forward
        handle._modules += [pair.conv, pair.norm]
        handle.pairs.append(FoldPair(f.conv_name, f.norm_name, pair))
    for note in skipped:
        logger.info("bnctl.fold: %s", note)
    return handle
