"""Layers of other libraries (timm, torchvision.ops, detectron2), on look-alikes written in conftest,
and the tools that would silently undo a policy ("frozen means frozen").

tests/integrations runs the same checks against the real libraries (make test-integrations).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnctl
from conftest import (
    FrozenBatchNorm2d,
    FrozenBatchNormAct2d,
    SyncBatchNormAct,
    TimmBatchNormAct2d,
    TimmSplitBatchNorm2d,
)

PRESETS = sorted(bnctl.PRESETS)


def _with_stats(layer: nn.Module, seed: int = 0) -> nn.Module:
    """``layer`` with non-trivial statistics and affine values (in its buffers or Parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in [("running_mean", torch.randn(3, generator=g)),
                           ("running_var", torch.rand(3, generator=g) + 0.5),
                           ("weight", torch.rand(3, generator=g) + 0.5), ("bias", torch.randn(3, generator=g))]:
            getattr(layer, key).copy_(value)
    return layer


# -- timm's norm+act layers: known by name, no registration ------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_timm_batchnormact2d_follows_every_preset_and_keeps_its_activation(preset):
    layer, plain = _with_stats(TimmBatchNormAct2d(3)), nn.BatchNorm2d(3)
    plain.load_state_dict(layer.state_dict())
    bnctl.apply(layer, preset)
    bnctl.apply(plain, preset)
    x = torch.randn(8, 3, 4, 4)
    for mode in (True, False):
        assert torch.equal(layer.train(mode)(x), torch.relu(plain.train(mode)(x)))
    assert torch.equal(layer.running_mean, plain.running_mean)
    assert torch.equal(layer.num_batches_tracked, plain.num_batches_tracked)


def test_timm_batchnormact2d_default_is_bit_identical_to_the_unmodified_layer():
    layer = _with_stats(TimmBatchNormAct2d(3, act=nn.SiLU()))
    original = copy.deepcopy(layer)
    bnctl.apply(layer, "torch")
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    for mode in (True, False, True):
        y, ref = layer.train(mode)(x), original.train(mode)(x)
        assert torch.equal(y, ref)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, [x, layer.weight], g)
        rx, rw = torch.autograd.grad(ref, [x, original.weight], g)
        assert torch.equal(gx, rx) and torch.equal(gw, rw)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, key), getattr(original, key))


def test_frozen_timm_layer_in_train_equals_eval():
    layer = _with_stats(TimmBatchNormAct2d(3))
    bnctl.apply(layer, "frozen")
    x = torch.randn(8, 3, 4, 4)
    assert torch.equal(layer.train()(x), layer.eval()(x))


@pytest.mark.parametrize("preset", PRESETS)
def test_sync_batchnorm_act_follows_every_preset_without_a_process_group(preset):
    layer, plain = _with_stats(SyncBatchNormAct(3)), nn.BatchNorm2d(3)
    layer.act = nn.ReLU()
    plain.load_state_dict(layer.state_dict())
    bnctl.apply(layer, preset)
    bnctl.apply(plain, preset)
    x = torch.randn(8, 3, 4, 4)
    assert torch.equal(layer.train()(x), torch.relu(plain.train()(x)))
    assert torch.equal(layer.running_var, plain.running_var)


def _split_model() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), TimmSplitBatchNorm2d(3))
    with torch.no_grad():
        model.train()
        for _ in range(3):  # the main and the auxiliary layer learn different statistics
            model(torch.cat([torch.randn(4, 3, 4, 4), 3 * torch.randn(4, 3, 4, 4) + 2]))
    return model


@pytest.mark.parametrize("preset", ["frozen", "frozen_stats", "test_time"])
def test_split_batchnorm_policy_alike_in_train_and_eval_runs_the_whole_batch_as_eval(preset):
    model = _split_model()
    bnctl.apply(model, preset)
    x = torch.randn(8, 3, 4, 4)
    assert torch.equal(model.train()(x), model.eval()(x))


def test_split_batchnorm_auxiliary_layers_follow_the_policy_of_their_layer():
    model = _split_model()
    handle = bnctl.apply(model, "running_update", include="1")
    assert handle.layers == ["1", "1.aux_bn.0"]
    aux = model[1].aux_bn[0]
    before, var_before = aux.running_mean.clone(), aux.running_var.clone()
    x = torch.randn(8, 3, 4, 4)
    y = model.train()(x)
    h = model[0](x)[4:]  # the second split, normalized with the auxiliary layer's old statistics
    expected = F.batch_norm(h, before, var_before, aux.weight, aux.bias, False, 0.0, aux.eps)
    assert torch.allclose(y[4:], expected, atol=1e-6)
    assert not torch.equal(aux.running_mean, before)  # ...which were then updated from that split
    handle.remove()
    assert type(aux) is nn.BatchNorm2d and type(model[1]) is TimmSplitBatchNorm2d


# -- FrozenBatchNorm2d backbones ---------------------------------------------------------------


def _backbone(frozen_cls=FrozenBatchNorm2d) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 3, 1), _with_stats(frozen_cls(3)), nn.ReLU(), nn.Conv2d(3, 3, 1),
                         _with_stats(frozen_cls(3), seed=1))


def test_frozen_batchnorm_is_listed_and_reported():
    model = _backbone()
    assert [n for n, _ in bnctl.batchnorm_layers(model)] == ["1", "4"]
    rows = bnctl.report(model, torch.randn(4, 3, 4, 4)).layers
    assert [(r.name, r.cls, r.train, r.eval, r.affine) for r in rows] == [
        ("1", "FrozenBatchNorm2d", "running/none", "running/none", "buffers")] + [
        ("4", "FrozenBatchNorm2d", "running/none", "running/none", "buffers")]
    assert rows[0].mean_shift is not None


@pytest.mark.parametrize("frozen_cls", [FrozenBatchNorm2d, FrozenBatchNormAct2d])
def test_apply_puts_an_equivalent_bnctl_layer_in_place_and_remove_puts_the_original_back(frozen_cls):
    model = _backbone(frozen_cls)
    originals = [model[1], model[4]]
    x = torch.randn(4, 3, 4, 4)
    expected = model(x)
    handle = bnctl.apply(model, "frozen")
    assert type(model[1]).__name__ in ("BatchNorm2d", "BatchNormAct2d") and isinstance(model[1], bnctl.BatchNorm2d)
    assert model[1].policy.name == "frozen" and not model[1].weight.requires_grad
    assert torch.allclose(model.train()(x), expected, atol=1e-6)  # scale-and-shift vs the kernel: rounding
    handle.remove()
    assert model[1] is originals[0] and model[4] is originals[1]
    assert torch.equal(model(x), expected)


def test_what_was_learned_on_a_stand_in_is_kept_in_the_original():
    model = _backbone()
    original = model[1]
    handle = bnctl.apply(model, "frozen_stats")
    stand_in = model[1]
    assert stand_in.weight.requires_grad and isinstance(stand_in.weight, nn.Parameter)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()(torch.randn(4, 3, 4, 4)).square().mean().backward()
    opt.step()
    learned = stand_in.weight.detach().clone()
    assert not torch.equal(learned, original.weight)
    handle.remove()
    assert model[1] is original and torch.equal(original.weight, learned)
    assert int(stand_in.num_batches_tracked) == 0  # frozen_stats never updated the statistics


@pytest.mark.parametrize("cast", ["double", "half"])
def test_a_dtype_change_under_a_stand_in_reaches_the_original(cast):
    """apply, model.double() (or .half()), remove: the original comes back in the model's new dtype holding
    the stand-in's values, as model.double() without bnctl would have left it."""
    model = _backbone()
    plain = copy.deepcopy(model)
    handle = bnctl.apply(model, "frozen")
    getattr(model, cast)(), getattr(plain, cast)()
    handle.remove()
    x = torch.randn(4, 3, 4, 4, dtype=plain[0].weight.dtype)
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    if cast == "double":  # (no float16 convolution on the CPU)
        assert torch.equal(model(x), plain(x))


def test_recalibrate_reaches_frozen_batchnorm_and_writes_into_it():
    model = _backbone()
    original = model[1]
    data = [3 * torch.randn(16, 3, 4, 4) + 1 for _ in range(4)]
    done = bnctl.recalibrate(model, data, layers="1")
    assert done == ["1"] and model[1] is original
    h = torch.cat([model[0](x) for x in data]).transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(original.running_mean.double(), h.mean(1), atol=1e-5)
    assert torch.allclose(original.running_var.double(), h.var(1), rtol=1e-4)


def test_frozen_batchnorm_errors_name_the_fix():
    with pytest.raises(ValueError, match="FrozenBatchNorm2d: expected a model containing"):
        bnctl.apply(_with_stats(FrozenBatchNorm2d(3)), "frozen")
    model = _backbone()
    with pytest.raises(ValueError, match=r"^1: a buffers-only FrozenBatchNorm2d cannot hold domains.*bnctl.apply"):
        bnctl.add_domains(model, "target")
    with bnctl.no_update(model):  # never updates anyway: nothing to hold
        model.train()(torch.randn(4, 3, 4, 4))
    model = _backbone(FrozenBatchNormAct2d)
    handle = bnctl.apply(model, "frozen")
    with pytest.raises(ValueError, match="stands in for a FrozenBatchNormAct2d.*handle.remove"):
        bnctl.revert(model)
    handle.remove()


def test_stand_ins_nest_with_other_policies_lifo():
    model = _backbone()
    original = model[1]
    outer = bnctl.apply(model, "frozen")
    inner = bnctl.apply(model, "running_update")
    with pytest.raises(RuntimeError, match="reverse order"):
        outer.remove()
    assert model[1].policy.name == "running_update"
    inner.remove()
    outer.remove()
    assert model[1] is original


# -- frozen means frozen -------------------------------------------------------------------------


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 4, 4))
    return model


def test_frozen_weight_gets_no_gradient_even_after_requires_grad_is_turned_back_on():
    model = _model()
    bnctl.apply(model, "frozen")
    model[1].requires_grad_(True)  # what Lightning's BaseFinetuning.make_trainable does
    model.train()(torch.randn(8, 3, 4, 4)).sum().backward()
    assert model[1].weight.grad is None and model[1].bias.grad is None
    assert model[0].weight.grad is not None
    found = bnctl.report(model).layers[0].warnings
    assert any("requires_grad=True, but the policy freezes them" in w for w in found)


def test_report_warns_when_a_learning_policy_was_frozen_afterwards():
    model = _model()
    bnctl.apply(model, "frozen_stats")
    model.requires_grad_(False)
    assert any("requires_grad=False was set after" in w for w in bnctl.report(model).layers[0].warnings)


def test_swa_update_bn_on_layers_that_never_update_warns_and_points_to_recalibrate():
    model = _model()
    bnctl.apply(model, "frozen")
    with pytest.warns(UserWarning, match=r"^1: running statistics reset.*'frozen'.*bnctl.recalibrate") as caught:
        torch.optim.swa_utils.update_bn([torch.randn(8, 3, 4, 4)], model)
    assert len([w for w in caught if "reset" in str(w.message)]) == 1
    model = _model()
    bnctl.apply(model, "running_update")  # updates in train(): update_bn refills the statistics
    x = torch.randn(8, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.optim.swa_utils.update_bn([x], model)
    h = model[0](x).transpose(0, 1).reshape(4, -1)
    assert torch.allclose(model[1].running_mean, h.mean(1), atol=1e-6)


def test_exact_type_tools_refuse_clearly():
    model = _model()
    bnctl.apply(model, "frozen")
    with pytest.raises(TypeError, match=r"^1: torch.jit.script cannot compile.*bnctl.revert"):
        torch.jit.script(model)
    with pytest.raises((NotImplementedError, AssertionError, RuntimeError), match="bnctl"):
        torch.ao.quantization.fuse_modules(model.eval(), [["0", "1"]])  # names bnctl's class
    bnctl.revert(model)
    torch.jit.script(model)


def test_apply_to_a_model_already_wrapped_in_ddp_refuses_with_the_fix():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            ddp = nn.parallel.DistributedDataParallel(_model())
            with pytest.raises(ValueError, match=r"DistributedDataParallel.*Apply the policy before wrapping"):
                bnctl.apply(ddp, "frozen")
            assert ddp.module[1].weight.requires_grad and type(ddp.module[1]) is nn.BatchNorm2d
            bnctl.apply(ddp, "running_update")  # changes no parameter: fine
        finally:
            dist.destroy_process_group()


def test_a_frozen_batchnorm_held_twice_is_replaced_at_both_places():
    model = _backbone()
    model[3] = model[1]  # the same object at two places
    handle = bnctl.apply(model, "running_update")
    assert model[3] is model[1] and isinstance(model[1], bnctl.BatchNorm2d)
    handle.remove()
    assert model[3] is model[1] and type(model[1]) is FrozenBatchNorm2d


def test_recalibrate_puts_every_original_back_when_it_fails():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _with_stats(FrozenBatchNorm2d(3)), _with_stats(FrozenBatchNorm2d(3)))
    originals = [model[1], model[2]]
    with pytest.raises(RuntimeError):
        bnctl.recalibrate(model, [torch.randn(4, 5, 4, 4)])  # wrong channel count for the conv
    assert [model[1], model[2]] == originals
