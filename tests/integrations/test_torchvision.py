"""bnctl on real torchvision models (tests/test_ecosystem.py and tests/test_compile.py check the same on
look-alikes and a toy network).

- ``torchvision.ops.FrozenBatchNorm2d`` (a classifier built with it, and the detection backbone
  ``resnet_fpn_backbone``, which uses it by default): listed, reported, replaced by ``bnctl.BatchNorm2d``
  stand-ins while a policy is applied, learned values written back on ``remove()``, recalibrated in place.
- Plain ``resnet18`` under ``torch.compile(fullgraph=True)`` and ``torch.export`` for every preset.
- ``torch.ao.quantization.fuse_modules`` matches exact classes: it refuses a bnctl layer, and works
  after ``bnctl.revert``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from _support import CLASSES, PRESETS, applied, assert_same_state, images, sgd_steps, state, warmed
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import bnctl

# Where bnctl computes batch statistics with other ops than eager's fused kernel (while exporting),
# running statistics may differ in the last float32 bit (as in tests/test_compile.py).
ULPS = dict(rtol=1e-6, atol=1e-7)


@functools.cache
def _plain() -> nn.Module:
    """A warmed torchvision resnet18 with nn.BatchNorm2d; never modified, copy it."""
    torch.manual_seed(0)
    return warmed(torchvision.models.resnet18(weights=None, num_classes=CLASSES))


def plain_resnet() -> nn.Module:
    return copy.deepcopy(_plain())


def frozen_resnet() -> nn.Module:
    """resnet18 built with FrozenBatchNorm2d, holding the warmed model's statistics (not the initial 0 and 1)."""
    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES, norm_layer=FrozenBatchNorm2d)
    model.load_state_dict(_plain().state_dict())
    return model.eval()


def frozen_backbone() -> nn.Module:
    """The detection backbone (FPN on resnet18, FrozenBatchNorm2d by default), statistics from the warmed model."""
    model = resnet_fpn_backbone(backbone_name="resnet18", weights=None)
    model.body.load_state_dict({k: v for k, v in _plain().state_dict().items() if not k.startswith("fc.")})
    return model.eval()


FROZEN_MODELS = {"resnet18": frozen_resnet, "fpn_backbone": frozen_backbone}


def frozen_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output, the FPN's feature maps flattened into one tensor."""
    y = model(x)
    return torch.cat([v.flatten() for v in y.values()]) if isinstance(y, dict) else y


# -- FrozenBatchNorm2d -------------------------------------------------------------------------


@pytest.mark.parametrize("which", FROZEN_MODELS)
def test_frozen_batchnorm_is_listed_and_reported(which):
    model = FROZEN_MODELS[which]()
    names = [n for n, _ in frozen_layers(model)]
    assert len(names) == 20
    assert [n for n, _ in bnctl.batchnorm_layers(model)] == names
    rows = bnctl.report(model, images(0)).layers
    assert [r.name for r in rows] == names
    assert {(r.cls, r.train, r.eval, r.affine) for r in rows} == {
        ("FrozenBatchNorm2d", "running/none", "running/none", "buffers")
    }
    assert all(r.mean_shift is not None for r in rows)


@pytest.mark.parametrize("which", FROZEN_MODELS)
def test_frozen_puts_equivalent_stand_ins_in_place_and_remove_puts_the_originals_back(which):
    model = FROZEN_MODELS[which]()
    originals = frozen_layers(model)
    x = images(0)
    with torch.no_grad():
        before = output(model, x)
    handle = bnctl.apply(model, "frozen")
    assert not frozen_layers(model)
    for name, _ in originals:
        stand_in = model.get_submodule(name)
        assert isinstance(stand_in, bnctl.BatchNorm2d) and stand_in.policy.name == "frozen", name
        assert not stand_in.weight.requires_grad
    with torch.no_grad():
        y = output(model.train(), x)
        assert torch.allclose(y, before, atol=1e-5)  # scale-and-shift vs the kernel: rounding
        assert torch.equal(y, output(model.eval(), x))
    handle.remove()
    assert all(model.get_submodule(n) is m for n, m in originals)
    with torch.no_grad():
        assert torch.equal(output(model, x), before)


def test_what_frozen_stats_learned_on_the_stand_ins_is_kept_in_the_originals():
    model = frozen_resnet()
    originals = frozen_layers(model)
    statistics = {k: v for k, v in state(model).items() if "running_" in k}
    handle = bnctl.apply(model, "frozen_stats")
    stand_ins = [model.get_submodule(n) for n, _ in originals]
    assert all(s.weight.requires_grad and isinstance(s.weight, nn.Parameter) for s in stand_ins)
    sgd_steps(model)
    learned = [(s.weight.detach().clone(), s.bias.detach().clone()) for s in stand_ins]
    assert not torch.equal(learned[0][0], originals[0][1].weight)
    handle.remove()
    for (name, original), (weight, bias) in zip(originals, learned):
        assert model.get_submodule(name) is original, name
        assert torch.equal(original.weight, weight) and torch.equal(original.bias, bias), name
    assert_same_state({k: v for k, v in state(model).items() if "running_" in k}, statistics)


def test_recalibrate_writes_exact_statistics_into_the_original_frozen_batchnorm():
    model = frozen_resnet()
    originals = frozen_layers(model)
    data = [images(seed, n=8, shift=0.5, scale=3.0) for seed in range(4)]
    done = bnctl.recalibrate(model, data)
    assert done == [n for n, _ in originals]
    assert all(model.get_submodule(n) is m for n, m in originals)
    with torch.no_grad():
        h = torch.cat([model.conv1(x) for x in data]).double()
    h = h.transpose(0, 1).reshape(h.shape[1], -1)
    assert torch.allclose(model.bn1.running_mean.double(), h.mean(1), rtol=1e-4, atol=1e-6)
    assert torch.allclose(model.bn1.running_var.double(), h.var(1), rtol=1e-4)


# -- plain resnet18 under graph capture ------------------------------------------------------


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_resnet18_trains_exactly_as_eager(preset, dynamo):
    eager, compiled = applied(_plain(), preset), applied(_plain(), preset)
    want = sgd_steps(eager)
    got = sgd_steps(compiled, torch.compile(compiled, backend="aot_eager", fullgraph=True))
    assert torch.equal(got, want)
    assert_same_state(compiled, eager)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("preset", PRESETS)
def test_exported_resnet18_matches_eager(preset, mode):
    eager, model = applied(_plain(), preset), applied(_plain(), preset)
    getattr(eager, mode)()
    getattr(model, mode)()
    if preset == "recalibrate":  # a cumulative average keeps its sums outside the buffers: refused
        with pytest.raises(RuntimeError, match="^bn1: a cumulative average keeps its running sums outside"):
            torch.export.export(model, (images(0),))
        return
    exported = torch.export.export(model, (images(0),)).module()
    for seed in range(2):  # two batches: what the graph keeps across calls must be in its buffers
        x = images(seed)
        with torch.no_grad():
            assert torch.equal(exported(x), eager(x))
        got, want = state(exported), state(eager)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], **ULPS, msg=k)


# -- tools that match exact classes ------------------------------------------------------------


def test_fuse_modules_refuses_a_bnctl_layer_and_works_after_revert():
    model = plain_resnet().eval()
    bnctl.apply(model, "frozen")
    with pytest.raises(AssertionError, match="did not find fuser method.*bnctl"):
        torch.ao.quantization.fuse_modules(model, [["conv1", "bn1", "relu"]])
    assert isinstance(model.bn1, bnctl.BatchNorm2d)  # nothing changed
    bnctl.revert(model)
    assert type(model.bn1) is nn.BatchNorm2d
    x = images(0)
    with torch.no_grad():
        want = model(x)
        fused = torch.ao.quantization.fuse_modules(model, [["conv1", "bn1", "relu"]])
        assert isinstance(fused.bn1, nn.Identity)
        assert torch.allclose(fused(x), want, atol=1e-5)
