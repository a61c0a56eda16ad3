"""bnctl.fold on real torchvision and timm models (tests/test_fold.py checks the same on look-alikes).

- Pairs: every conv -> BatchNorm adjacency, verified independently of torch.fx by forward hooks (the
  BatchNorm's input is the very tensor its conv returned, and nothing else reads it), is found; resnet18's
  20 pairs by name.
- Exactness in float64: under ``frozen`` and ``frozen_stats`` in train() and ``torch`` in eval(), the
  folded model's output and every parameter gradient equal those of an unfolded copy (1e-9), with some
  pairs folded (those whose conv weight fits their output); buffers are untouched.
- ``handle.remove()`` leaves no instance-level ``forward`` and the state dict as it was.
- A resnet18 built with ``torchvision.ops.FrozenBatchNorm2d``: folded too, exactly.
"""

from __future__ import annotations

import copy
import functools
import importlib

import pytest
import timm
import torch
import torchvision
from _support import CLASSES, applied, images, warmed
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FrozenBatchNorm2d, StochasticDepth

import bnctl

EXACT = dict(rtol=1e-9, atol=1e-9)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

BUILDERS = {
    "tv_resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=CLASSES),
    "tv_mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES),
    "tv_efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=CLASSES),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=CLASSES,
                                                      drop_rate=0.0, drop_path_rate=0.0),
    "timm_mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False,
                                                            num_classes=CLASSES, drop_rate=0.0, drop_path_rate=0.0),
}
NAMES = list(BUILDERS)

RESNET18_PAIRS = [("conv1", "bn1")] + [
    pair
    for layer, downsample in (("layer1", False), ("layer2", True), ("layer3", True), ("layer4", True))
    for block in ("0", "1")
    for pair in [(f"{layer}.{block}.conv1", f"{layer}.{block}.bn1"), (f"{layer}.{block}.conv2", f"{layer}.{block}.bn2")]
    + ([(f"{layer}.{block}.downsample.0", f"{layer}.{block}.downsample.1")] if downsample and block == "0" else [])
]


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, FrozenBatchNorm2d))


def no_dropout(model: nn.Module) -> nn.Module:
    """torchvision's classifiers keep Dropout and StochasticDepth: off, so train() forwards are deterministic."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, StochasticDepth)):
            m.p = 0.0
    return model


def randomized_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm weight and bias away from 1 and 0 (buffers too, for FrozenBatchNorm2d)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_norm(m):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


@functools.cache
def _base(name: str) -> nn.Module:
    """A warmed float64 model with random BatchNorm affines; never modified, copy it."""
    torch.manual_seed(0)
    model = randomized_affine(warmed(no_dropout(BUILDERS[name]())))
    return model.double().eval()


def model_of(name: str) -> nn.Module:
    return copy.deepcopy(_base(name))


def adjacencies(model: nn.Module, x: torch.Tensor) -> set[tuple[str, str]]:
    """``(conv, bn)`` names where, in an unfolded eval() forward, the BatchNorm's input is the tensor its conv
    returned and that conv output is read by no other hooked module, each called once."""
    outputs: dict[str, list[torch.Tensor]] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, CONVS):
            hooks.append(m.register_forward_hook(lambda m, i, out, name=name: outputs.setdefault(name, []).append(out)))
        if next(m.children(), None) is None or is_norm(m) or isinstance(m, CONVS):  # leaves and norms
            hooks.append(m.register_forward_pre_hook(lambda m, i, name=name: inputs.setdefault(name, []).append(i)))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    found = set()
    for conv, outs in outputs.items():
        if len(outs) != 1:
            continue
        readers = [n for n, args in inputs.items() for a in args for t in a if t is outs[0]]
        if len(readers) == 1 and is_norm(modules[readers[0]]) and len(inputs[readers[0]]) == 1:
            found.add((conv, readers[0]))
    return found


def run(model: nn.Module, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, dict]:
    """Output and every parameter gradient (None where there is none) for a random upstream gradient."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype))
    return y.detach(), {k: p.grad for k, p in model.named_parameters()}


def assert_same(got, want) -> None:
    (y, grads), (y_ref, grads_ref) = got, want
    torch.testing.assert_close(y, y_ref, **EXACT)
    assert grads.keys() == grads_ref.keys()
    for k, g in grads.items():
        if g is None or grads_ref[k] is None:
            assert g is None and grads_ref[k] is None, k
        else:
            torch.testing.assert_close(g, grads_ref[k], **EXACT, msg=k)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def assert_same_buffers(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def folded_count(model: nn.Module, handle: bnctl.FoldHandle, x: torch.Tensor) -> int:
    """How many pairs folded in one no-grad forward: a folded pair's BatchNorm only applies what follows
    its normalization (bnctl.fold's ``drop_act``); hooks would stop folding, so none is used."""
    fold_module = importlib.import_module("bnctl.fold")
    original, folded = fold_module.drop_act, []

    def counting(layer, y):
        folded.append(layer)
        return original(layer, y)

    fold_module.drop_act = counting
    try:
        with torch.no_grad():
            model(x)
    finally:
        fold_module.drop_act = original
    return len(folded)


X = images(7, n=2, size=32).double()


# -- pairs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fold_finds_every_conv_batchnorm_adjacency(name):
    model = model_of(name)
    expected = adjacencies(model, X)
    handle = bnctl.fold(model)
    modules = dict(model.named_modules())
    assert len(handle.pairs) > 0 and handle.skipped == []
    assert len(set(handle.pairs)) == len(handle.pairs)
    assert all(isinstance(modules[c], CONVS) and is_norm(modules[b]) for c, b in handle.pairs)
    assert set(handle.pairs) == expected
    # in these models every BatchNorm directly follows its conv
    assert {b for _, b in handle.pairs} == {n for n, m in modules.items() if is_norm(m)}
    if name.startswith("timm_"):
        assert {type(modules[b]).__name__ for _, b in handle.pairs} == {"BatchNormAct2d"}
    if name == "tv_resnet18":
        assert handle.pairs == RESNET18_PAIRS and len(handle.pairs) == 20
    handle.remove()


@pytest.mark.parametrize("name", NAMES)
def test_folding_happens(name):
    """The pairs whose conv weight has no more elements than their output fold: some at 32 px, more at 96 px."""
    model = model_of(name).eval()
    handle = bnctl.fold(model)
    small = folded_count(model, handle, images(8, n=2, size=32).double())
    large = folded_count(model, handle, images(8, n=2, size=96).double())
    assert 0 < small <= large <= len(handle.pairs)
    handle.remove()


# -- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "training"), [("frozen", True), ("frozen_stats", True), ("torch", False)])
@pytest.mark.parametrize("name", NAMES)
def test_folded_equals_unfolded_in_float64(name, preset, training):
    ref = applied(_base(name), preset)
    model = applied(_base(name), preset)
    before = buffers(model)
    handle = bnctl.fold(model)
    assert handle.pairs
    for _ in range(2):  # twice: the decision to fold is made again at every forward
        want = run(ref, X, training)
        assert_same(run(model, X, training), want)
    assert_same_buffers(buffers(model), buffers(ref))
    assert_same_buffers(buffers(model), before)  # running statistics normalize, nothing updates
    assert folded_count(model, handle, X) > 0  # the comparison did run folded pairs (at least the stem)
    handle.remove()


# -- remove -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_remove_restores(name):
    model = model_of(name)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        want = model.eval()(X)
    handle = bnctl.fold(model)
    assert any("forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == list(state)
    with torch.no_grad():
        model.eval()(X)
    handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    got = model.state_dict()
    assert list(got) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in got.items())
    with torch.no_grad():
        assert torch.equal(model.eval()(X), want)
    handle.remove()  # idempotent


# -- FrozenBatchNorm2d ------------------------------------------------------------------------


def frozen_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES, norm_layer=FrozenBatchNorm2d)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return randomized_affine(model, seed=2).double()


def test_frozen_batchnorm2d_resnet18_folds_exactly():
    ref = frozen_resnet18()
    model = copy.deepcopy(ref)
    before = buffers(model)
    handle = bnctl.fold(model)
    modules = dict(model.named_modules())
    assert handle.pairs == RESNET18_PAIRS and handle.skipped == []
    assert all(isinstance(modules[b], FrozenBatchNorm2d) for _, b in handle.pairs)
    for training in (True, False):  # FrozenBatchNorm2d normalizes with its buffers in either mode
        for _ in range(2):
            assert_same(run(model, X, training), run(ref, X, training))
    assert_same_buffers(buffers(model), before)
    handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


# -- where PyTorch and timm reach in (issue 20) -----------------------------------------------


@pytest.mark.parametrize("name", ["timm_resnet18", "timm_efficientnet_b0"])
@pytest.mark.parametrize("preset", ["frozen", "frozen_stats"])
def test_timm_grad_checkpointing_trains_folded(name, preset):
    """timm's set_grad_checkpointing runs its blocks under non-reentrant torch.utils.checkpoint inside the
    model's forward: the folded model trains (no CheckpointError), exactly, with the blocks' pairs folded in
    the forward and in its recomputation alike."""
    build = {"timm_resnet18": lambda: timm.create_model("resnet18", pretrained=False, num_classes=CLASSES),
             "timm_efficientnet_b0": BUILDERS["timm_efficientnet_b0"]}[name]
    torch.manual_seed(0)
    base = randomized_affine(warmed(no_dropout(build()))).double()
    base.set_grad_checkpointing(True)
    ref, model = applied(base, preset), applied(base, preset)
    handle = bnctl.fold(model)
    x = images(9, n=2, size=64).double()
    for _ in range(2):
        assert_same(run(model, x, True), run(ref, x, True))
    assert any(p.folded for p in handle.pairs if p[0] != "conv1" and p[0] != "conv_stem")  # inside checkpoints
    handle.remove()


@pytest.mark.parametrize("swap", ["timm_freeze_batch_norm_2d", "convert_sync_batchnorm"])
@pytest.mark.parametrize("name", ["tv_resnet18", "timm_efficientnet_b0"])
def test_a_batchnorm_swapped_after_folding_is_normalized_once(name, swap):
    """timm's freeze_batch_norm_2d and nn.SyncBatchNorm.convert_sync_batchnorm put new layers in place of the
    folded ones: those pairs run unfolded (and say why), the output is the swapped unfolded model's."""
    from timm.layers import freeze_batch_norm_2d

    convert = {"timm_freeze_batch_norm_2d": freeze_batch_norm_2d,
               "convert_sync_batchnorm": nn.SyncBatchNorm.convert_sync_batchnorm}[swap]
    model = model_of(name)
    handle = bnctl.fold(model)
    model = convert(model).eval()
    ref = convert(model_of(name)).eval()
    assert_same(run(model, X, False), run(ref, X, False))
    reasons = handle.unfolded()
    swapped = [p for p in handle.pairs if "was replaced since folding" in (p.reason or "")]
    assert swapped and len(swapped) == len(reasons)
    handle.remove()


def test_export_domain_of_a_folded_torchvision_model_is_plain():
    model = model_of("tv_resnet18")
    bnctl.add_domains(model, "target")
    bnctl.fold(model)
    exported = bnctl.export_domain(model, "target")
    assert all("forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
               for m in exported.modules())
    assert all(type(m) is nn.BatchNorm2d for m in exported.modules() if isinstance(m, _BatchNorm))
    with torch.no_grad(), bnctl.domain(model, "target"):
        torch.testing.assert_close(exported(X), model(X), **EXACT)


def test_resnet50_frozen_stats_folded_saves_what_frozen_batchnorm2d_saves():
    """The memory folding exists for (benchmarks/bench_memory.py measures it at 224 px): bytes of the distinct
    storages autograd saves, the model's own parameters and buffers left out, at 64 px."""

    def saved(model: nn.Module, x: torch.Tensor) -> int:
        own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        storages: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in own:
                storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())

    x = images(3, n=2, size=64)
    frozen = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).train()
    baseline = saved(frozen, x)
    for preset, limit in (("frozen", 1.0), ("frozen_stats", 1.05)):
        model = torchvision.models.resnet50(weights=None).train()
        bnctl.apply(model, preset)
        assert saved(model, x) <= limit * baseline or preset == "frozen_stats"
        bnctl.fold(model)
        assert saved(model, x) <= limit * baseline, preset
