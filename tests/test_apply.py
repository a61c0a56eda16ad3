"""Model-level control: apply, remove, using, revert, no_update, param_groups."""

import copy
import warnings

import pytest
import torch
from torch import nn

import bnctl


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def trained_net():
    net = Net().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 4, 4))
    return net


def test_apply_keeps_identity_params_buffers_hooks_and_isinstance():
    net = trained_net()
    bn = net.stem[1]
    ids = (id(bn), id(bn.weight), id(bn.running_mean))
    calls = []
    bn.register_forward_hook(lambda *a: calls.append(1))
    handle = bnctl.apply(net, "frozen_stats")
    assert (id(net.stem[1]), id(bn.weight), id(bn.running_mean)) == ids
    assert isinstance(bn, nn.BatchNorm2d) and type(bn).__name__ == "BatchNorm2d"
    net(torch.randn(2, 3, 4, 4))
    assert calls == [1]
    assert handle.layers == ["stem.1", "block.1", "head.2"]


def test_policy_survives_train_eval_sequences():
    net = trained_net()
    bnctl.apply(net, "frozen")
    before = copy.deepcopy(net.state_dict())
    for flag in (True, False, True):
        net.train(flag)
        net(torch.randn(4, 3, 4, 4))
    net = net.train()
    net(torch.randn(4, 3, 4, 4))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_in_train_equals_torch_eval_output():
    net = trained_net()
    ref = copy.deepcopy(net).eval()
    bnctl.apply(net, "frozen")
    net.train()
    net.block[2].p = 0.0  # dropout off for the comparison
    x = torch.randn(4, 3, 4, 4)
    assert torch.equal(net(x), ref(x))


def test_remove_restores_exactly():
    net = trained_net()
    classes = [type(m) for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    state = copy.deepcopy(net.state_dict())
    handle = bnctl.apply(net, "frozen")
    handle.remove()
    handle.remove()  # idempotent
    assert [type(m) for m in net.modules()] == classes
    assert [p.requires_grad for p in net.parameters()] == flags
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    assert not any(hasattr(m, "_bnctl") for m in net.modules())


def test_nested_handles_and_out_of_order_removal_is_refused():
    net = trained_net()
    outer = bnctl.apply(net, "frozen")
    inner = bnctl.apply(net, "running_update", include="stem.*")
    with pytest.raises(RuntimeError, match="reverse order"):
        outer.remove()
    assert net.stem[1].policy.name == "running_update"  # nothing was changed by the refusal
    inner.remove()
    assert net.stem[1].policy.name == "frozen"
    outer.remove()
    assert type(net.stem[1]) is nn.BatchNorm2d


@pytest.mark.parametrize(
    "include,exclude,expected",
    [
        ("stem.*", None, ["stem.1"]),
        (["stem.*", "head.*"], None, ["stem.1", "head.2"]),
        (None, "head.*", ["stem.1", "block.1"]),
        (lambda name, m: isinstance(m, nn.BatchNorm1d), None, ["head.2"]),
    ],
)
def test_include_exclude(include, exclude, expected):
    handle = bnctl.apply(trained_net(), "frozen", include=include, exclude=exclude)
    assert handle.layers == expected


def test_nothing_selected_is_an_error():
    with pytest.raises(ValueError, match=r"'nope\.\*', which matches no module\. Top-level modules: \['block', "):
        bnctl.apply(trained_net(), "frozen", include="nope.*")
    with pytest.raises(ValueError, match="stem.1"):
        bnctl.apply(trained_net(), "frozen", include="stem.0")


def test_single_layer_and_context_manager():
    bn = nn.BatchNorm1d(3).train()
    with bnctl.using(bn, "batch_no_update"):
        bn(torch.randn(4, 3))
        assert type(bn) is not nn.BatchNorm1d
    assert type(bn) is nn.BatchNorm1d and int(bn.num_batches_tracked) == 0
    with pytest.raises(KeyError):
        with bnctl.using(bn, "frozen_stats"):
            raise KeyError("boom")
    assert type(bn) is nn.BatchNorm1d and not hasattr(bn, "_bnctl")


def test_optimizer_built_before_keeps_working():
    net = trained_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    w = net.stem[1].weight.clone()
    bnctl.apply(net, "frozen_stats")
    net(torch.randn(4, 3, 4, 4)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(net.stem[1].weight, w)  # affine still learns


def test_track_running_stats_false_refuses_running_policies():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnctl.apply(model, "frozen")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnctl.apply(model, "recalibrate")
    with bnctl.no_update(model):  # nothing to freeze: allowed
        model(torch.randn(2, 3, 2, 2))
    bnctl.apply(model, "test_time")


def test_warns_when_freezing_never_updated_statistics():
    with pytest.warns(UserWarning, match="never updated"):
        bnctl.apply(Net(), "frozen")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnctl.apply(trained_net(), "frozen")
        bnctl.apply(Net(), "running_update")


def test_revert_gives_plain_modules_with_state():
    net = Net()
    net.stem[1] = bnctl.BatchNorm2d(4, policy="frozen")
    bnctl.apply(net, "running_update", include="block.*")
    net(torch.randn(4, 3, 4, 4))
    state = copy.deepcopy(net.state_dict())
    assert bnctl.revert(net) is net
    assert type(net.stem[1]) is nn.BatchNorm2d and type(net.block[1]) is nn.BatchNorm2d
    assert not any(hasattr(m, "_bnctl") for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    torch.save(net, __import__("io").BytesIO())  # a plain model pickles


def test_no_update_keeps_normalization_updates_nothing_and_restores():
    net = trained_net()
    bnctl.apply(net, "running_update", include="stem.*")
    before = copy.deepcopy(net.state_dict())
    net.train()
    net.block[2].p = 0.0
    x = torch.randn(4, 3, 4, 4)
    with bnctl.no_update(net):
        y = net(x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net.stem[1].policy.name == "running_update"
    assert type(net.block[1]) is nn.BatchNorm2d
    assert torch.equal(y, net(x))  # same normalization as outside the context
    with pytest.raises(ZeroDivisionError):
        with bnctl.no_update(net):
            raise ZeroDivisionError
    assert type(net.block[1]) is nn.BatchNorm2d


def test_param_groups_by_module_type():
    net = trained_net()
    bnctl.apply(net, "frozen", include="stem.*")
    groups = bnctl.param_groups(net, lr=0.1, bn_lr=1e-3, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    bn_ids = {id(p) for p in by_name["batchnorm"]["params"]}
    assert bn_ids == {id(p) for m in (net.block[1], net.head[2]) for p in m.parameters()}
    assert by_name["batchnorm"]["lr"] == 1e-3 and by_name["batchnorm"]["weight_decay"] == 0.0
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert set(all_ids) == trainable
    torch.optim.AdamW(groups)


def test_forum_settings_are_different_and_bnctl_gives_each():
    """bn.eval() vs train()+momentum=0+requires_grad=False (the forum thread)."""
    base = nn.BatchNorm2d(3)
    with torch.no_grad():
        base.running_mean.fill_(1.0)
        base.running_var.fill_(4.0)
        base.num_batches_tracked.fill_(10)
    x = torch.randn(8, 3, 4, 4)
    s1 = copy.deepcopy(base).eval()
    s2 = copy.deepcopy(base).train()
    s2.momentum = 0.0
    frozen = copy.deepcopy(base)
    bnctl.apply(frozen, "frozen")
    assert not torch.allclose(s1(x), s2(x))  # setting 2 normalizes with batch statistics
    assert int(s2.num_batches_tracked) == 11  # ... and still counts batches
    assert torch.equal(frozen.train()(x), s1(x))
    assert int(frozen.num_batches_tracked) == 10




# -- scopes compose with policies --------------------------------------------------------------


def test_apply_inside_no_update_then_both_end_leaves_a_normal_layer():
    bn = nn.BatchNorm1d(3).train()
    with bnctl.no_update(bn):
        handle = bnctl.apply(bn, "running_update")
        bn(torch.randn(8, 3))
        assert int(bn.num_batches_tracked) == 0  # the outer scope holds
    bn(torch.randn(8, 3))
    assert int(bn.num_batches_tracked) == 1 and bn.policy.name == "running_update"
    handle.remove()
    assert type(bn) is nn.BatchNorm1d
    bn(torch.randn(8, 3))
    assert int(bn.num_batches_tracked) == 2


def test_using_inside_no_update_writes_nothing():
    bn = nn.BatchNorm1d(3).train()
    before = copy.deepcopy(bn.state_dict())
    with bnctl.no_update(bn), bnctl.using(bn, "running_update"), bnctl.no_update(bn):
        bn(torch.randn(8, 3))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(bn) is nn.BatchNorm1d and "_bnctl" not in bn.__dict__


def test_remove_after_revert_has_nothing_left_to_undo():
    bn = nn.BatchNorm1d(3)
    handle = bnctl.apply(bn, "frozen")
    bnctl.revert(bn)
    handle.remove()
    assert type(bn) is nn.BatchNorm1d and bn.weight.requires_grad


def test_eval_forward_then_train_forward_then_one_backward_as_in_torch():
    """The train forward's update must not invalidate the eval graph; under the torch preset the
    gradients are torch's own, bit for bit."""
    ref = trained_net().stem[1]
    bn = copy.deepcopy(ref)
    bnctl.apply(bn, "torch")
    grads = []
    for layer in (ref, bn):
        x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        g = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        y1, y2 = layer.eval()(x), layer.train()(x)
        (y1 * g).sum().add((y2 * g).sum()).backward()
        grads.append((x.grad, layer.weight.grad, layer.bias.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(ref.running_var, bn.running_var)


def test_eval_forward_then_train_forward_then_one_backward():
    """Likewise under other policies."""
    for first, second in [("torch", "torch"), ("running_update", "running_update"), ("renorm", "renorm"),
                          ("frozen_stats", "torch")]:
        bn = trained_net().stem[1]
        x = torch.randn(4, 4, 4, 4, requires_grad=True)
        with bnctl.using(bn, first):
            y1 = bn.eval()(x)
        with bnctl.using(bn, second):
            y2 = bn.train()(x)
        (y1 * torch.randn_like(y1)).sum().add((y2 * torch.randn_like(y2)).sum()).backward()
        assert x.grad is not None


def test_param_groups_with_nothing_trainable_says_why():
    net = trained_net()
    bnctl.apply(net, "frozen_stats")
    net.requires_grad_(False)  # the wrong order: freezing after applying a learning policy
    with pytest.raises(ValueError, match="train_only_batchnorm"):
        bnctl.param_groups(net, lr=0.1)


class Deep(nn.Module):
    """ResNet-like names: layer1 holds blocks holding bn1; layer10 must not be taken for layer1."""

    def __init__(self):
        super().__init__()
        block = lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))  # noqa: E731
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(block(), block())
        self.layer10 = nn.Sequential(block())
        self.fc = nn.Linear(4, 2)


@pytest.mark.parametrize("selector,expected", [
    ("layer1", ["layer1.0.1", "layer1.1.1"]),
    (["layer1.1", "bn1"], ["bn1", "layer1.1.1"]),
    ("layer1*", ["layer1.0.1", "layer1.1.1", "layer10.0.1"]),  # globs as before
    ("layer1.*.1", ["layer1.0.1", "layer1.1.1"]),
])
def test_a_module_name_selects_that_module_and_everything_under_it(selector, expected):
    model = Deep()
    assert [n for n, _ in bnctl.batchnorm_layers(model, include=selector)] == expected
    assert bnctl.apply(model, "frozen", include=selector).layers == expected
    kept = [n for n, _ in bnctl.batchnorm_layers(model, exclude=selector)]
    assert sorted(kept) == sorted({n for n, _ in bnctl.batchnorm_layers(model)} - set(expected))


def test_prefix_selection_works_in_every_function_that_selects():
    model = Deep().train()
    x = torch.randn(2, 4, 3, 3)
    with bnctl.no_update(model, include="layer1"):
        for block in [*model.layer1, *model.layer10]:
            block(x)
    assert [int(b[1].num_batches_tracked) for b in [*model.layer1, *model.layer10]] == [0, 0, 1]
    assert bnctl.add_domains(model, "target", include="layer10") == ["layer10.0.1"]
    data = [torch.randn(4, 4, 3, 3)]
    assert bnctl.recalibrate(model.layer1, data, layers="1") == ["1.1"]


def test_a_name_that_matches_no_module_is_refused_with_the_closest_names():
    model = Deep()
    for call in (lambda: bnctl.apply(model, "frozen", include="layr1"),
                 lambda: bnctl.batchnorm_layers(model, include=["bn1", "layr1"]),
                 lambda: bnctl.no_update(model, include="layr1").__enter__()):
        with pytest.raises(ValueError, match=r"'layr1', which matches no module\. Closest module names: "
                                             r"\['layer1', 'layer10'"):
            call()
    assert bnctl.batchnorm_layers(model, exclude="nothing_like_it")  # exclude may name what a model lacks


def test_a_module_without_batchnorm_under_it_names_the_closest_layers():
    with pytest.raises(ValueError, match=r"got none \(include='fc'.*BatchNorm layers in the model: \['bn1'"):
        bnctl.apply(Deep(), "frozen", include="fc")
