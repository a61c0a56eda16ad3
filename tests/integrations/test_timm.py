"""bnctl on real timm models and layers (tests/test_ecosystem.py checks the same on look-alikes).

- Eight small models across families (plain ``BatchNorm2d``: resnet, dla, ghostnet; timm's
  ``BatchNormAct2d``: efficientnet, mobilenetv3, regnet, cs3darknet, repvgg), every preset, with no
  ``register_subclass``: under ``torch`` bit-identical to the unmodified model, under ``frozen`` train()
  equal to eval().
- timm's layer variants: ``BatchNormAct2d``, ``SyncBatchNormAct`` (``convert_sync_batchnorm``, no process
  group), ``FrozenBatchNormAct2d`` (``freeze_batch_norm_2d``: replaced by a stand-in while applied) and
  ``SplitBatchNorm2d`` (``convert_splitbn_model``).
- A timm model under ``torch.compile(fullgraph=True)`` trains exactly as eagerly.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from _support import CLASSES, PRESETS, applied, assert_same_state, batchnorms, images, labels, sgd_steps, warmed
from timm.layers import (
    BatchNormAct2d,
    FrozenBatchNormAct2d,
    SplitBatchNorm2d,
    SyncBatchNormAct,
    convert_splitbn_model,
    convert_sync_batchnorm,
    freeze_batch_norm_2d,
)
from torch import nn

import bnctl

MODELS = [
    "resnet18",  # BatchNorm2d
    "efficientnet_b0",  # BatchNormAct2d with SiLU
    "mobilenetv3_small_050",  # BatchNormAct2d with hard-swish
    "regnetx_002",  # ConvNormAct
    "cs3darknet_focus_s",  # CSP
    "dla46_c",  # DLA, BatchNorm2d
    "ghostnet_050",  # BatchNorm2d and one BatchNormAct2d
    "repvgg_a0",  # identity branches that are a lone BatchNormAct2d
]


@functools.cache
def _base(name: str) -> nn.Module:
    """A warmed timm model (no dropout, so train() forwards are deterministic); never modified, copy it."""
    torch.manual_seed(0)
    return warmed(timm.create_model(name, pretrained=False, num_classes=CLASSES, drop_rate=0.0))


def timm_model(name: str) -> nn.Module:
    return copy.deepcopy(_base(name))


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """A train() forward and backward: the output and every parameter's gradient (None where there is none)."""
    model.zero_grad()
    y = model.train()(x)
    F.cross_entropy(y, labels(0, len(x))).backward()
    return y.detach(), {k: p.grad for k, p in model.named_parameters()}


def assert_same_training_step(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """One train() forward and backward on each: same output, gradients and (updated) state; then the
    same eval() output."""
    y, grads = forward_backward(model, x)
    want_y, want_grads = forward_backward(reference, x)
    assert torch.equal(y, want_y)
    assert grads.keys() == want_grads.keys()
    for k, g in grads.items():
        want = want_grads[k]
        assert (g is None and want is None) or (g is not None and want is not None and torch.equal(g, want)), k
    assert_same_state(model, reference)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))


# -- whole models, every preset ---------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", MODELS)
def test_every_preset_applies_to_timm_models_and_remove_restores(name, preset):
    model = timm_model(name)
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    handle = bnctl.apply(model, preset)
    layers = batchnorms(model)
    assert layers and len(handle.layers) == len(layers)
    assert all(layer.policy.name == preset for layer in layers)
    y, _ = forward_backward(model, images(0))
    assert torch.isfinite(y).all() and torch.isfinite(model.eval()(images(1))).all()
    handle.remove()
    assert [type(m) for m in model.modules()] == classes
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", MODELS)
def test_torch_preset_is_bit_identical_to_the_unmodified_timm_model(name):
    model, original = timm_model(name), timm_model(name)
    bnctl.apply(model, "torch")
    assert_same_training_step(model, original, images(0))


@pytest.mark.parametrize("name", MODELS)
def test_frozen_timm_model_in_train_equals_eval(name):
    model = applied(_base(name), "frozen")
    x = images(0)
    with torch.no_grad():
        assert torch.equal(model.train()(x), model.eval()(x))
    assert_same_state(model, applied(_base(name), "frozen"))  # nothing was updated


# -- timm's layer variants -------------------------------------------------------------------


def _with_stats(layer: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g))
    return layer


@pytest.mark.parametrize("preset", PRESETS)
def test_batchnormact2d_follows_every_preset_and_keeps_its_activation(preset):
    layer = _with_stats(BatchNormAct2d(8, act_layer=nn.SiLU))
    plain = nn.BatchNorm2d(8)
    plain.load_state_dict(layer.state_dict())
    bnctl.apply(layer, preset)
    bnctl.apply(plain, preset)
    x = torch.randn(4, 8, 5, 5) * 2 + 1
    for mode in (True, False, True):
        assert torch.equal(layer.train(mode)(x), F.silu(plain.train(mode)(x)))
    assert_same_state(layer, plain)


@pytest.mark.parametrize("preset", PRESETS)
def test_sync_batchnorm_act_model_follows_every_preset_as_the_unconverted_model(preset):
    """convert_sync_batchnorm turns BatchNormAct2d into SyncBatchNormAct; without a process group, each
    preset must give what it gives on the unconverted model."""
    model = convert_sync_batchnorm(timm_model("mobilenetv3_small_050"))
    layers = batchnorms(model)
    assert layers and all(isinstance(m, SyncBatchNormAct) for m in layers)
    unconverted = timm_model("mobilenetv3_small_050")
    bnctl.apply(model, preset)
    bnctl.apply(unconverted, preset)
    assert all(layer.policy.name == preset for layer in layers)
    assert_same_training_step(model, unconverted, images(0))


def _frozen_act_model() -> nn.Module:
    model = freeze_batch_norm_2d(timm_model("mobilenetv3_small_050"))
    assert not batchnorms(model)
    return model.eval()


def _frozen_act_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FrozenBatchNormAct2d)]


@pytest.mark.parametrize("preset", PRESETS)
def test_frozen_batchnorm_act2d_gets_stand_ins_under_every_preset_and_comes_back(preset):
    model = _frozen_act_model()
    originals = _frozen_act_layers(model)
    assert len(originals) == 34
    x = images(0)
    with torch.no_grad():
        before = model(x)
    handle = bnctl.apply(model, preset)
    for name, _ in originals:
        stand_in = model.get_submodule(name)
        assert isinstance(stand_in, bnctl.BatchNorm2d) and stand_in.policy.name == preset, name
    assert not _frozen_act_layers(model)
    with torch.no_grad():
        y_train, y_eval = model.train()(x), model.eval()(x)
    assert torch.isfinite(y_train).all()
    if preset == "frozen":
        assert torch.allclose(y_eval, before, atol=1e-5)
        assert torch.equal(y_train, y_eval)
    handle.remove()
    assert [n for n, _ in _frozen_act_layers(model)] == [n for n, _ in originals]
    assert all(model.get_submodule(n) is m for n, m in originals)


def _split_model() -> nn.Module:
    """resnet18 with SplitBatchNorm2d (2 splits), main and auxiliary layers warmed on different data."""
    model = convert_splitbn_model(timm_model("resnet18"), 2)
    model.train()
    with torch.no_grad():  # the second half of each batch goes through the auxiliary layers
        for seed in range(2):
            model(torch.cat([images(seed), images(seed + 10, shift=-1.0, scale=0.5)]))
    return model


def _split_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SplitBatchNorm2d)]


@torch.no_grad()
def _train_then_eval(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.train()(x), model.eval()(x)


@pytest.mark.parametrize("preset", PRESETS)
def test_split_batchnorm_every_preset(preset):
    model = _split_model()
    original = copy.deepcopy(model)
    splits = _split_layers(model)
    assert len(splits) == 20
    handle = bnctl.apply(model, preset)
    assert sum(".aux_bn." in name for name in handle.layers) == 20  # auxiliary layers follow their layer
    assert all(layer.policy.name == preset for layer in batchnorms(model))
    x = images(0, n=8)
    y_train, y_eval = _train_then_eval(model, x)
    assert torch.isfinite(y_train).all() and torch.isfinite(y_eval).all()
    if preset == "frozen":
        assert torch.equal(y_train, y_eval)
    if preset == "torch":  # timm's split forward, bit for bit, main and auxiliary statistics alike
        want_train, want_eval = _train_then_eval(original, x)
        assert torch.equal(y_train, want_train) and torch.equal(y_eval, want_eval)
        assert_same_state(model, original)
    handle.remove()
    assert _split_layers(model) == splits and all(type(m) is SplitBatchNorm2d for m in splits)


# -- torch.compile -----------------------------------------------------------------------------


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", ["torch", "running_update"])
def test_compiled_timm_model_trains_exactly_as_eager(preset, dynamo):
    """lcnet_050: 27 BatchNormAct2d (hard-swish), small enough to compile in seconds."""
    base = warmed(timm.create_model("lcnet_050", pretrained=False, num_classes=CLASSES))
    eager, compiled = applied(base, preset), applied(base, preset)
    want = sgd_steps(eager)
    got = sgd_steps(compiled, torch.compile(compiled, backend="aot_eager", fullgraph=True))
    assert torch.equal(got, want)
    assert_same_state(compiled, eager)
