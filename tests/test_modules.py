"""Layers: bit-identical default, every preset's behaviour, bad input."""

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

import bnctl
from conftest import TOL, BatchNormAct2d, SuperAct2d, SyncBatchNormAct, reference_bn

CLASSES = {1: (nn.BatchNorm1d, bnctl.BatchNorm1d), 2: (nn.BatchNorm2d, bnctl.BatchNorm2d),
           3: (nn.BatchNorm3d, bnctl.BatchNorm3d)}
SHAPES = {1: [(6, 3), (6, 3, 5)], 2: [(6, 3, 4, 5), (2, 3, 1, 1)], 3: [(4, 3, 2, 3, 2)]}


def pair(dim, **kwargs):
    ref_cls, our_cls = CLASSES[dim]
    ref = ref_cls(3, **kwargs)
    ours = our_cls(3, **kwargs)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_same_state(ref, ours):
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert k1 == k2
        assert torch.equal(v1, v2), k1


def run_both(ref, ours, x):
    xr = x.clone().requires_grad_()
    xo = x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    g = torch.randn_like(yr)
    yr.backward(g)
    yo.backward(g)
    assert torch.equal(yr, yo)
    assert yr.is_contiguous(memory_format=torch.channels_last) == yo.is_contiguous(
        memory_format=torch.channels_last
    )
    assert torch.equal(xr.grad, xo.grad)
    if ref.affine:
        assert torch.equal(ref.weight.grad, ours.weight.grad)
        assert torch.equal(ref.bias.grad, ours.bias.grad)
    assert_same_state(ref, ours)


CONFIGS = list(
    itertools.product(
        [0.1, 0.0, None],  # momentum
        [True, False],  # affine
        [True, False],  # track_running_stats
        [torch.float32, torch.float64],
    )
)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("momentum,affine,track,dtype", CONFIGS)
def test_torch_preset_bit_identical(dim, momentum, affine, track, dtype):
    ref, ours = pair(dim, momentum=momentum, affine=affine, track_running_stats=track)
    ref, ours = ref.to(dtype), ours.to(dtype)
    for shape in SHAPES[dim]:
        for training in (True, True, False, True):
            ref.train(training)
            ours.train(training)
            run_both(ref, ours, torch.randn(shape, dtype=dtype) * 2 + 1)


def test_torch_preset_bit_identical_channels_last():
    ref, ours = pair(2)
    for training in (True, False):
        ref.train(training), ours.train(training)
        x = torch.randn(4, 3, 5, 6).to(memory_format=torch.channels_last)
        run_both(ref, ours, x)


def test_torch_preset_bit_identical_bfloat16_autocast():
    ref, ours = pair(2)
    conv = nn.Conv2d(3, 3, 1)
    for training in (True, False):
        ref.train(training), ours.train(training)
        x = torch.randn(4, 3, 5, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = conv(x)
            assert h.dtype == torch.bfloat16
            yr, yo = ref(h), ours(h)
        assert yr.dtype == yo.dtype
        assert torch.equal(yr, yo)
        assert_same_state(ref, ours)


def test_track_running_stats_switched_off_after_construction():
    ref, ours = pair(2)
    ref.track_running_stats = ours.track_running_stats = False
    for training in (True, False):
        ref.train(training), ours.train(training)
        run_both(ref, ours, torch.randn(4, 3, 2, 2))


def test_state_dict_keys_and_strict_round_trip():
    plain = nn.BatchNorm2d(3)
    for name in bnctl.PRESETS:
        ours = bnctl.BatchNorm2d(3, policy=name)
        assert list(ours.state_dict()) == list(plain.state_dict())
        ours.load_state_dict(plain.state_dict(), strict=True)
        plain.load_state_dict(ours.state_dict(), strict=True)
    assert isinstance(ours, nn.BatchNorm2d)


# -- behaviour of every preset: flags, buffers, counters after a sequence of calls --------

# preset -> (normalizes with, updates) under train() and eval()
EXPECTED = {
    "torch": (("batch", True), ("running", False)),
    "frozen": (("running", False), ("running", False)),
    "frozen_stats": (("running", False), ("running", False)),
    "running_update": (("running", True), ("running", False)),
    "batch_no_update": (("batch", False), ("running", False)),
    "test_time": (("batch", False), ("batch", False)),
    "recalibrate": (("batch", True), ("batch", True)),
    "renorm": (("renorm", True), ("running", False)),
}


def pretrained(policy):
    bn = bnctl.BatchNorm2d(3, policy="torch")
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        bn.num_batches_tracked.fill_(100)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bnctl.apply(bn, policy)
    return bn


@pytest.mark.parametrize("preset", sorted(EXPECTED))
@pytest.mark.parametrize("training", [True, False])
def test_preset_behaviour(preset, training):
    bn = pretrained(preset).train(training)
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    y = bn(x)
    normalize, updates = EXPECTED[preset][0 if training else 1]
    rm, rv = before["running_mean"], before["running_var"]
    expected = reference_bn(x, rm, rv, bn.weight, bn.bias, normalize, rmax=1.0, dmax=0.0)
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    after = bn.state_dict()
    assert torch.equal(after["num_batches_tracked"], before["num_batches_tracked"] + updates)
    assert torch.equal(after["running_mean"], rm) is not updates
    assert torch.equal(after["weight"], before["weight"])  # forward never touches parameters
    # the policy survives model.train()/model.eval()
    bn.train(not training).train(training)
    assert bn.policy.name == preset


def test_running_update_uses_pre_update_stats_then_updates_by_formula():
    bn = pretrained("running_update").train()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    y = bn(x)
    torch.testing.assert_close(y, reference_bn(x, rm, rv, bn.weight, bn.bias, "running"))
    n = 8 * 16
    mean_b = x.detach().mean((0, 2, 3))
    var_b = x.detach().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(bn.running_mean, 0.9 * rm + 0.1 * mean_b)
    torch.testing.assert_close(bn.running_var, 0.9 * rv + 0.1 * var_b * n / (n - 1))
    y.backward(torch.randn_like(y))  # buffers changed after forward: backward still works
    assert x.grad is not None


def test_frozen_affine_and_stale_grad_cleared():
    bn = bnctl.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2)).sum().backward()
    assert bn.weight.grad is not None
    handle = bnctl.apply(bn, "frozen")
    assert bn.weight.grad is None and not bn.weight.requires_grad
    w, b = bn.weight.clone(), bn.bias.clone()
    opt = torch.optim.AdamW(bn.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        bn.train()(torch.randn(4, 3, 2, 2, requires_grad=True)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(bn.weight, w) and torch.equal(bn.bias, b)
    handle.remove()
    assert bn.weight.requires_grad


def test_blend_policy_matches_reference():
    policy = bnctl.Policy("batch", "none", 0.25, "none", name=None)
    bn = pretrained(policy).eval()
    x = torch.randn(6, 3, 3, 3)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    torch.testing.assert_close(bn(x), reference_bn(x, rm, rv, bn.weight, bn.bias, 0.25))
    assert torch.equal(bn.running_mean, rm)


def test_momentum_override_and_cumulative_none():
    bn = pretrained(bnctl.Policy("running", "ema", momentum=0.5)).train()
    rm = bn.running_mean.clone()
    x = torch.randn(8, 3, 2, 2)
    bn(x)
    torch.testing.assert_close(bn.running_mean, 0.5 * rm + 0.5 * x.mean((0, 2, 3)))
    # momentum=None on the layer: cumulative average, as PyTorch
    bn = bnctl.BatchNorm2d(3, momentum=None, policy="running_update").train()
    xs = [torch.randn(8, 3, 2, 2) for _ in range(3)]
    for x in xs:
        bn(x)
    torch.testing.assert_close(
        bn.running_mean, torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    )  # the first batch replaces the initial values, as in PyTorch
    assert int(bn.num_batches_tracked) == 3


def test_renorm_warmup_schedule():
    bn = pretrained(bnctl.Policy("renorm", "ema", renorm_warmup=(100, 200))).train()
    bn.num_batches_tracked.fill_(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    before = (bn.running_mean.clone(), bn.running_var.clone())
    # until warm-up starts, r=1 and d=0: plain batch-statistics BatchNorm
    torch.testing.assert_close(bn(x), reference_bn(x, *before, bn.weight, bn.bias, "batch"))
    bn.num_batches_tracked.fill_(10_000)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    full = reference_bn(x, *before, bn.weight, bn.bias, "renorm", rmax=3.0, dmax=5.0)
    torch.testing.assert_close(bn(x), full)
    bn.num_batches_tracked.fill_(150)  # half-way: rmax 2, dmax 2.5
    before = (bn.running_mean.clone(), bn.running_var.clone())
    half = reference_bn(x, *before, bn.weight, bn.bias, "renorm", rmax=2.0, dmax=2.5)
    torch.testing.assert_close(bn(x), half)


# -- bad input and faults ---------------------------------------------------------------


@pytest.mark.parametrize("preset", ["torch", "test_time", "renorm", "batch_no_update"])
def test_one_value_per_channel_error_names_layer(preset):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    bnctl.apply(model, preset)
    with pytest.raises(ValueError, match=r"^1: .*\(1, 3\).*drop_last=True"):
        model.train()(torch.randn(1, 4))


def test_one_value_fallback_uses_running_stats_and_updates_nothing():
    bn = pretrained(bnctl.Policy(fallback=True)).train()
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(1, 3, 1, 1)
    y = bn(x)
    torch.testing.assert_close(
        y, reference_bn(x, before["running_mean"], before["running_var"], bn.weight, bn.bias, "running")
    )
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_non_finite_batch_never_reaches_buffers(preset):
    bn = pretrained(preset).train()
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(8, 3, 4, 4)
    x[0, 1, 0, 0] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = bn(x)
    assert torch.isnan(y).any()  # NaN in, NaN out: not hidden
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    updates = EXPECTED[preset][0][1]
    assert bn.skipped_updates == int(updates)
    assert any("skipped" in str(w.message) for w in caught) is updates
    bn(torch.randn(8, 3, 4, 4))  # a finite batch afterwards updates again
    assert int(bn.num_batches_tracked) == 100 + updates


def test_an_empty_batch_is_counted_as_torch_counts_it():
    """nn.BatchNorm counts every train() forward, an empty one too (with momentum=None the next average
    depends on the count); the statistics stay."""
    bn = pretrained("torch").train()
    native = nn.BatchNorm2d(3).train()
    native.load_state_dict(bn.state_dict())
    y = bn(torch.randn(0, 3, 4, 4))
    assert y.shape == native(torch.randn(0, 3, 4, 4)).shape == (0, 3, 4, 4)
    for (k, v), w in zip(bn.state_dict().items(), native.state_dict().values()):
        assert torch.equal(v, w), k
    with bnctl.no_update(bn):  # nothing is due: nothing counted
        bn(torch.randn(0, 3, 4, 4))
    assert torch.equal(bn.num_batches_tracked, native.num_batches_tracked)


def test_wrong_channels_and_dims_are_clear():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3))
    bnctl.apply(model, "torch")
    with pytest.raises(ValueError, match=r"^1: expected 3 channels in dim 1, got input of shape \(2, 4, 5, 5\)"):
        model(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"^1: expected 4D input \(got 3D input\)"):
        model[1](torch.randn(2, 3, 5))


def test_repr_shows_policy():
    assert "policy=frozen" in repr(bnctl.BatchNorm2d(3, policy="frozen"))


def test_batch_statistics_without_graph_match_reference():
    bn = pretrained("recalibrate").eval()
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    with torch.no_grad():
        y = bn(x)
    want = reference_bn(x, None, None, bn.weight, bn.bias, "batch")
    torch.testing.assert_close(y, want, **TOL[torch.float32])


def test_skip_count_survives_policy_changes():
    bn = bnctl.BatchNorm2d(3).train()
    handle = bnctl.apply(bn, "running_update")
    x = torch.randn(8, 3, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn(x)
    handle.remove()
    assert bn.policy.name == "torch" and bn.skipped_updates == 1


def test_non_finite_running_statistics_block_updates_loudly():
    bn = pretrained("torch").train()
    with torch.no_grad():
        bn.running_var[1] = float("inf")  # a damaged checkpoint
    before = copy.deepcopy(bn.state_dict())
    with pytest.warns(RuntimeWarning, match="running statistics are already non-finite"):
        bn(torch.randn(8, 3, 2, 2))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    bnctl.recalibrate(bn, [torch.randn(8, 3, 2, 2)])  # recalibration repairs them
    assert torch.isfinite(bn.running_var).all()


# -- classes: static for torch's, made at run time for other libraries' subclasses ---------

def test_subclass_calling_super_keeps_its_activation():
    bn = SuperAct2d(3)
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
    bnctl.apply(bn, "frozen_stats")
    y = bn.train()(torch.randn(4, 3, 2, 2))
    assert (y == 0).all()  # normalized with running mean 5, then ReLU
    assert int(bn.num_batches_tracked) == 0


def test_subclass_computing_batchnorm_itself_is_refused_then_registered():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3), nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match=r"^1: .*BatchNormAct2d overrides forward.*register_subclass"):
        bnctl.apply(model, "frozen")
    assert type(model[2]) is nn.BatchNorm2d  # nothing was half-converted
    handle = bnctl.apply(model, "frozen", exclude="1")
    handle.remove()
    bnctl.register_subclass(BatchNormAct2d, lambda layer, y: layer.act(layer.drop(y)))
    try:
        bnctl.apply(model, "frozen")
        with torch.no_grad():
            model[1].running_mean.fill_(100.0)
        y = model[1].train()(torch.randn(4, 3, 2, 2))
        assert (y == 0).all() and int(model[1].num_batches_tracked) == 0
    finally:
        bnctl.unregister_subclass(BatchNormAct2d)


def test_sync_batchnorm_on_cpu_and_lazy_batchnorm():
    sync = nn.SyncBatchNorm(3)
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(sync.state_dict())
    bnctl.apply(sync, "torch")
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(sync.train()(x), ref.train()(x))
    bnctl.apply(sync, "frozen")
    sync(x)
    assert torch.equal(sync.num_batches_tracked, ref.num_batches_tracked)

    lazy = nn.LazyBatchNorm2d()
    with pytest.raises(ValueError, match="materialized"):
        bnctl.apply(lazy, "frozen")
    lazy(x)
    bnctl.apply(lazy, "frozen")
    lazy(x)
    assert int(lazy.num_batches_tracked) == 1


@pytest.mark.parametrize("cls,ours", [(nn.BatchNorm1d, bnctl.BatchNorm1d), (nn.BatchNorm2d, bnctl.BatchNorm2d),
                                      (nn.BatchNorm3d, bnctl.BatchNorm3d),
                                      (nn.SyncBatchNorm, bnctl.modules.SyncBatchNorm)])
def test_torch_classes_become_importable_bnctl_classes(cls, ours):
    layer = cls(3)
    handle = bnctl.apply(layer, "frozen_stats")
    assert type(layer) is ours and isinstance(layer, cls)
    handle.remove()
    assert type(layer) is cls


def test_runtime_classes_are_cached_and_named_honestly():
    a, b = SuperAct2d(3), SuperAct2d(3)
    bnctl.apply(a, "frozen"), bnctl.apply(b, "torch")
    assert type(a) is type(b) and type(a).__name__ == "SuperAct2d"
    assert type(a).__qualname__ != SuperAct2d.__qualname__ and type(a).__module__ == "bnctl.modules"


def test_model_with_policies_pickles_whole_and_loads_with_its_policies(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), SuperAct2d(3),
                          bnctl.BatchNorm2d(3, policy="running_update"), nn.BatchNorm2d(3))
    bnctl.apply(model, "frozen", include="1")
    bnctl.apply(model, bnctl.Policy("batch", "none", 0.25, "none"), include="2")
    x = torch.randn(4, 3, 2, 2)
    model.train()(x)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert [getattr(m, "policy", None) for m in loaded] == [getattr(m, "policy", None) for m in model]
    assert loaded[1].weight.requires_grad is False
    for training in (True, False):
        a, b = copy.deepcopy(model).train(training), copy.deepcopy(loaded).train(training)
        assert torch.equal(a(x), b(x))
        assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    bnctl.revert(loaded)
    assert type(loaded[1]) is nn.BatchNorm2d and type(loaded[2]) is SuperAct2d


def test_constructor_refuses_running_policies_without_running_stats():
    """SPEC 5/6: the constructor refuses what apply refuses (it used to normalize with batch statistics)."""
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnctl.BatchNorm2d(4, track_running_stats=False, policy="frozen")
    bn = bnctl.BatchNorm2d(4, track_running_stats=False, policy="test_time")
    assert bn.policy.name == "test_time"


def test_unregister_subclass():
    bnctl.register_subclass(BatchNormAct2d, lambda layer, y: y)
    bnctl.unregister_subclass(BatchNormAct2d)
    with pytest.raises(TypeError, match="register_subclass"):
        bnctl.apply(BatchNormAct2d(3), "frozen")
    with pytest.raises(KeyError):
        bnctl.unregister_subclass(BatchNormAct2d)


def test_renorm_on_an_empty_batch_writes_no_statistics():
    bn = pretrained("renorm").train()
    before = copy.deepcopy(bn.state_dict())
    y = bn(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    for k, v in bn.state_dict().items():
        want = before[k] + 1 if k == "num_batches_tracked" else before[k]  # counted, as an EMA's empty batch
        assert torch.equal(v, want), k


def test_a_forward_under_inference_mode_leaves_no_inference_tensors_behind():
    bn = bnctl.BatchNorm2d(3, policy="recalibrate")
    with torch.inference_mode():
        bn(torch.randn(4, 3, 2, 2))
    bn(torch.randn(4, 3, 2, 2))  # updates the accumulator made under inference mode
    assert int(bn.num_batches_tracked) == 2


def test_eps_zero_names_the_layer_where_pytorch_refuses_it():
    """PyTorch refuses eps <= 0 in training and accepts it in eval(): so does every policy, by the
    statistics it normalizes with, and the error names the layer."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, eps=0.0)).train()
    native = copy.deepcopy(model)
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="eps must be positive"):
        native(x)
    for preset in ("torch", "renorm", "batch_no_update", bnctl.Policy(0.5, "none", "running", "none")):
        bnctl.apply(model, preset)
        with pytest.raises(ValueError, match=r"^1: expected eps > 0 to normalize with batch statistics"):
            model(x)
    bnctl.apply(model, "torch")
    assert torch.equal(model.eval()(x), native.eval()(x))
    bnctl.apply(model, "frozen")
    assert torch.equal(model.train()(x), native(x))


def test_repr_shows_the_momentum_the_layer_uses_and_the_modified_policy():
    import dataclasses

    bn = bnctl.BatchNorm2d(3, policy=dataclasses.replace(bnctl.get_policy("running_update"), momentum=1e-3))
    assert "momentum=0.001," in repr(bn) and "policy=running_update(momentum=0.001)" in repr(bn)
    assert "momentum=0.1," in repr(bnctl.BatchNorm2d(3))


def test_policy_momentum_none_is_torchs_cumulative_average():
    import dataclasses

    ref = nn.BatchNorm2d(3, momentum=None).train()
    bn = bnctl.BatchNorm2d(3, policy=dataclasses.replace(bnctl.get_policy("torch"), momentum=None)).train()
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2)
        ref(x), bn(x)
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)


def test_skipped_updates_warn_once_per_layer_from_the_users_line():
    bn = pretrained("running_update").train()
    x = torch.randn(8, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            bn(x)
    assert bn.skipped_updates == 12
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # the first skip, then the 10th
    assert "non-finite" in messages[0] and "diverging" in messages[0] and "10 running-statistics" in messages[1]
    assert all(w.filename == __file__ for w in caught)


def test_skips_counted_on_a_device_are_reported_when_bnctl_lets_go():
    bn = nn.BatchNorm1d(3)
    with pytest.warns(RuntimeWarning, match="1 running-statistics update") as caught:
        with bnctl.no_update(bn):
            bn._bnctl.count(torch.tensor(False))  # what a device forward records, without a host sync
    assert caught[0].filename == __file__ and type(bn) is nn.BatchNorm1d


def test_sync_batchnorm_subclass_calling_super_forward_keeps_its_activation():
    layer = SyncBatchNormAct(3)
    layer.act = nn.ReLU()
    with torch.no_grad():
        layer.running_mean.fill_(5.0)
    bnctl.apply(layer, "frozen_stats")
    assert (layer.train()(torch.randn(4, 3, 2, 2)) == 0).all()  # normalized with mean 5, then ReLU
    assert int(layer.num_batches_tracked) == 0
