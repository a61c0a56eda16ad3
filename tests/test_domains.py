"""Domain-specific statistics: selection, isolation, checkpoints, export, AdaBN."""

import collections
import copy
import re

import pytest
import torch
from torch import nn

import bnctl
from conftest import data, make_model


def model_with_domains(affine=False):
    model = make_model().train()
    with torch.no_grad():
        model(data(16))
    bnctl.add_domains(model, ["target", "night"], affine=affine)
    return model


def test_forward_in_a_domain_reads_and_updates_only_that_domain():
    model = model_with_domains()
    before = copy.deepcopy(model.state_dict())
    with bnctl.domain(model, "target"):
        model.train()(data(8, seed=5) + 3)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith("__target") for k in changed)
    assert "1.num_batches_tracked__target" in changed


def test_poison_other_domains_never_reach_outputs():
    model = model_with_domains(affine=True).eval()
    with torch.no_grad():
        for layer in (model[1], model[5]):
            for name in ("night",):
                for base in ("running_mean", "running_var", "weight", "bias"):
                    getattr(layer, f"{base}__{name}").fill_(float("nan"))
            for base in ("running_mean", "running_var", "weight", "bias"):
                getattr(layer, base).fill_(float("nan"))  # the default domain too
    with torch.no_grad(), bnctl.domain(model, "target"):
        assert torch.isfinite(model(data(4))).all()
    with torch.no_grad(), bnctl.domain(model, "night"):
        assert torch.isnan(model(data(4))).all()  # the poison is real


def test_plain_checkpoint_initializes_every_domain_strictly():
    plain = make_model()
    with torch.no_grad():
        plain.train()(data(16))
    model = model_with_domains(affine=True)
    model.load_state_dict(plain.state_dict(), strict=True)
    for base in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        for d in ("target", "night"):
            assert torch.equal(getattr(model[1], f"{base}__{d}"), getattr(plain[1], base))
    # and a domain checkpoint round-trips, domains included
    with bnctl.domain(model, "night"):
        model.train()(data(8) * 5)
    other = model_with_domains(affine=True)
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(other[1].running_var__night, model[1].running_var__night)


def test_export_domain_is_a_plain_model_with_that_domain():
    model = model_with_domains(affine=True)
    with bnctl.domain(model, "target"):
        model.train()(data(8) + 2)
    exported = bnctl.export_domain(model, "target")
    assert type(exported[1]) is nn.BatchNorm2d
    plain = make_model()
    plain.load_state_dict(exported.state_dict(), strict=True)
    assert torch.equal(plain[1].running_mean, model[1].running_mean__target)
    assert torch.equal(plain[1].weight, model[1].weight__target)
    x = data(4)
    model.eval(), plain.eval()
    with torch.no_grad(), bnctl.domain(model, "target"):
        assert torch.equal(model(x), plain(x))
    assert "running_mean__target" in dict(model[1].named_buffers())  # original unchanged


def test_adabn_recalibrate_one_domain_leaves_everything_else_bit_identical():
    model = model_with_domains(affine=True).eval()
    before = copy.deepcopy(model.state_dict())
    target = [data(8, seed=s) * 0.3 - 1 for s in range(4)]
    bnctl.recalibrate(model, target, domain="target")
    after = model.state_dict()
    for k, v in after.items():
        if "running" in k and k.endswith("__target") or k.endswith("num_batches_tracked__target"):
            continue
        assert torch.equal(v, before[k]), k
    h = model[0](torch.cat(target))
    torch.testing.assert_close(model[1].running_mean__target, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert int(model[1].num_batches_tracked__target) == 4


def test_domain_errors_and_removal():
    model = model_with_domains()
    with pytest.raises(ValueError, match="Known domains"):
        with bnctl.domain(model, "day"):
            pass
    with pytest.raises(ValueError, match="already exist"):
        bnctl.add_domains(model, ["target"])
    with pytest.raises(ValueError, match="identifier"):
        bnctl.add_domains(model, ["default"])
    with pytest.raises(ValueError, match="export_domain"):
        bnctl.revert(model)
    bnctl.remove_domains(model)
    assert bnctl.domains(model[1]) == ["default"]
    assert list(model.state_dict()) == list(make_model().state_dict())
    bnctl.revert(model)
    assert type(model[1]) is nn.BatchNorm2d


def test_domain_selection_restored_on_error():
    model = model_with_domains()
    with pytest.raises(KeyError):
        with bnctl.domain(model, "night"):
            raise KeyError
    before = model[1].running_mean.clone()
    model.train()(data(8) + 10)
    assert not torch.equal(model[1].running_mean, before)  # back on the default domain


def test_cumulative_statistics_are_kept_per_domain():
    """The recalibrate preset averages each domain's data on its own."""
    bn = nn.BatchNorm1d(2)
    bnctl.add_domains(bn, "tgt")
    bnctl.apply(bn, "recalibrate")
    src, tgt = torch.randn(16, 2), torch.randn(16, 2) * 2 + 10
    bn(src[:8])
    with bnctl.domain(bn, "tgt"):
        bn(tgt[:8])
    bn(src[8:])
    with bnctl.domain(bn, "tgt"):
        bn(tgt[8:])
    torch.testing.assert_close(bn.running_mean, src.mean(0))
    torch.testing.assert_close(bn.running_mean__tgt, tgt.mean(0))
    torch.testing.assert_close(bn.running_var__tgt, tgt.var(0))


def test_export_of_an_unknown_domain_is_an_error_not_the_default():
    model = model_with_domains()
    with pytest.raises(ValueError, match=r"got 'targte'. Known domains: \['default', 'night', 'target'\]"):
        bnctl.export_domain(model, "targte")


def test_a_single_name_is_one_domain():
    bn = nn.BatchNorm1d(3)
    bnctl.add_domains(bn, "source")
    assert bnctl.domains(bn) == ["default", "source"]


def test_recalibrate_a_domain_reaches_only_layers_that_have_it():
    model = make_model().eval()
    bnctl.add_domains(model, "target", include="1")
    before = copy.deepcopy(model.state_dict())
    assert bnctl.recalibrate(model, [data(8)], domain="target") == ["1"]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.endswith("__target"))
    with pytest.raises(ValueError, match="Known domains"):
        bnctl.recalibrate(model, [data(8)], domain="night")


def test_a_checkpoint_from_before_num_batches_tracked_loads_strictly():
    """Version-1 BatchNorm state dicts (no num_batches_tracked) load as in torch, domains included."""
    plain = make_model()
    old = plain.state_dict()
    for key in [k for k in old if k.endswith("num_batches_tracked")]:
        del old[key]
    old._metadata = {k: {"version": 1} for k in ("1", "5")}
    model = model_with_domains()
    model.load_state_dict(old, strict=True)
    assert torch.equal(model[1].running_mean__target, plain[1].running_mean)


def test_inside_a_domain_block_the_layer_s_own_tensors_are_the_domain_s():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    model(torch.randn(8, 4))
    bnctl.add_domains(model, "target", affine=True)
    bn = model[1]
    names = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")
    with bnctl.domain(model, "target"):
        model(torch.randn(8, 4) * 3 + 5)
        for name in names:
            assert getattr(bn, name) is getattr(bn, f"{name}__target"), name
        assert int(bn.num_batches_tracked) == 2 and not torch.equal(bn.running_mean, bn._buffers["running_mean"])
        bn.running_var = torch.full((3,), 7.0)  # assigning, too, is the domain's
        bn.weight.data.fill_(3.0)
    assert bn.running_var__target.eq(7).all() and not bn.running_var.eq(7).any()
    assert bn.weight__target.eq(3).all() and not bn.weight.eq(3).any()
    for name in names:
        assert getattr(bn, name) is bn._parameters.get(name, bn._buffers.get(name)), name
    assert int(bn.num_batches_tracked) == 1


def test_a_checkpoint_saved_inside_a_domain_block_equals_one_saved_outside():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    model(torch.randn(8, 4))
    bnctl.add_domains(model, "target", affine=True)
    with bnctl.domain(model, "target"):
        model(torch.randn(8, 4) + 5)
        inside = {k: v.clone() for k, v in model.state_dict().items()}
        buffers_inside = dict(model.named_buffers())
    outside = model.state_dict()
    assert list(inside) == list(outside)
    for key in outside:
        assert torch.equal(inside[key], outside[key]), key
    assert buffers_inside == dict(model.named_buffers())
    fresh = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    bnctl.add_domains(fresh, "target", affine=True)
    with bnctl.domain(fresh, "target"):  # loading inside a block fills each domain from its own keys
        fresh.load_state_dict(inside, strict=True)
        assert torch.equal(fresh[1].running_mean, inside["1.running_mean__target"])
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, inside[key]), key
    old = collections.OrderedDict((k, v) for k, v in inside.items() if "num_batches_tracked" not in k)
    old._metadata = {"1": {"version": 1}}  # from before num_batches_tracked: each domain keeps its counter
    with bnctl.domain(fresh, "target"):
        fresh.load_state_dict(old)
    assert int(fresh[1].num_batches_tracked) == 1 and int(fresh[1].num_batches_tracked__target) == 2


def test_report_shows_the_active_domain_and_its_counts():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    model(torch.randn(8, 4))
    bnctl.add_domains(model, "target", include="1")
    outside = bnctl.report(model)
    with bnctl.domain(model, "target"):
        model(torch.randn(8, 4))
        model(torch.randn(8, 4))
        inside = bnctl.report(model)
    assert [(r.domain, r.num_batches_tracked) for r in outside.layers] == [("default", 1), ("default", 1)]
    assert [(r.domain, r.num_batches_tracked) for r in inside.layers] == [("target", 3), ("default", 3)]
    assert re.search(r"^1\s+BatchNorm1d\s+torch\s+target\s", str(inside), re.M)
    assert re.search(r"^3\s+BatchNorm1d\s+torch\s+-\s", str(inside), re.M)


# -- mixed-domain batches: one label per sample ----------------------------------------------------

LABELS = {
    "sorted names": ["default"] * 3 + ["target"] * 4 + ["night"] * 3,
    "shuffled names": ["night", "target", "default", "target", "night", "default", "target", "night", "default",
                       "target"],
    "index tensor": torch.tensor([2, 1, 0, 1, 2, 0, 1, 2, 0, 1]),  # domains(layer): default, target, night
}


def mixed_net(affine=False, policy="torch"):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3),
    ).double().train()
    with torch.no_grad():
        model(data(16).double())
    bnctl.add_domains(model, ["target", "night"], affine=affine)
    with torch.no_grad():  # distinct statistics and affine per domain
        for i, name in enumerate(["target", "night"]):
            with bnctl.domain(model, name):
                model(data(16, seed=10 + i).double() * (i + 2) - i)
            for layer in (model[1], model[4]):
                if affine:
                    getattr(layer, f"weight__{name}").mul_(1.5 + i)
                    getattr(layer, f"bias__{name}").add_(0.3 * (i + 1))
    bnctl.apply(model, policy)
    return model


def names_of(labels):
    if isinstance(labels, torch.Tensor):
        return [["default", "target", "night"][i] for i in labels.tolist()]
    return labels


def per_domain(model, x, labels, upstream):
    """The reference: each domain's samples through the model alone (in that domain), outputs put back."""
    names = names_of(labels)
    out = torch.empty(x.shape[0], 3, dtype=x.dtype)
    for name in dict.fromkeys(names):
        index = torch.tensor([i for i, n in enumerate(names) if n == name])
        with bnctl.domain(model, name):
            part = model(x[index])
        (part * upstream[index]).sum().backward()
        out[index] = part.detach()
    return out


@pytest.mark.parametrize("policy", ["torch", "frozen_stats", "running_update"])
@pytest.mark.parametrize("affine", [False, True], ids=["shared affine", "affine per domain"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("labels", LABELS.values(), ids=LABELS.keys())
def test_a_mixed_batch_equals_each_domains_samples_run_alone(labels, mode, affine, policy):
    ours, want = mixed_net(affine, policy), mixed_net(affine, policy)
    getattr(ours, mode)()
    getattr(want, mode)()
    x = (data(10, seed=3).double() * torch.linspace(0.5, 2, 10, dtype=torch.float64).view(-1, 1, 1, 1))
    x_ours, x_want = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(10, 3, dtype=torch.float64)
    with bnctl.domain(ours, labels):
        out = ours(x_ours)
    (out * upstream).sum().backward()
    expected = per_domain(want, x_want, labels, upstream)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_ours.grad, x_want.grad, rtol=0, atol=1e-12)
    for (k, p), (_, q) in zip(ours.named_parameters(), want.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-11, msg=k)
    torch.testing.assert_close(dict(ours.named_buffers()), dict(want.named_buffers()), rtol=0, atol=1e-13)


@pytest.mark.parametrize("labels", ["sorted names", "shuffled names"])
def test_gradcheck_of_a_mixed_batch(labels):
    model = mixed_net(affine=True)[:2]
    x = data(10, seed=4).double().requires_grad_()
    with bnctl.no_update(model), bnctl.domain(model, LABELS[labels]):
        assert torch.autograd.gradcheck(model, (x,))
        assert torch.autograd.gradgradcheck(model, (x,))


@pytest.mark.parametrize("name", ["default", "target"])
def test_labels_that_all_agree_are_the_single_domain_block(name):
    ours, want = mixed_net(affine=True), mixed_net(affine=True)
    x = data(10, seed=3).double()
    with bnctl.domain(ours, [name] * 10):
        out = ours(x)
    with bnctl.domain(want, name):
        expected = want(x)
    assert torch.equal(out, expected)
    for (k, v), (_, w) in zip(ours.state_dict().items(), want.state_dict().items()):
        assert torch.equal(v, w), k


def test_a_domain_absent_from_the_batch_is_untouched():
    model = mixed_net()
    night = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("__night")}
    with bnctl.domain(model, ["default", "target"] * 5):
        model(data(10).double())
    for k, v in night.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_ghost_batches_apply_within_each_domain():
    import dataclasses
    policy = dataclasses.replace(bnctl.PRESETS["torch"], ghost=2)
    ours, want = mixed_net(policy=policy), mixed_net(policy=policy)
    x, labels = data(10, seed=3).double(), LABELS["shuffled names"]
    with bnctl.domain(ours, labels):
        out = ours(x)
    expected = per_domain(want, x.clone().requires_grad_(), labels, torch.zeros(10, 3, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(dict(ours.named_buffers()), dict(want.named_buffers()), rtol=0, atol=1e-13)


def test_accumulate_pools_each_domains_samples():
    ours, want = mixed_net(), mixed_net()
    xs = [data(10, seed=s).double() for s in range(3)]
    labels = LABELS["shuffled names"]
    with bnctl.accumulate(ours), bnctl.domain(ours, labels):
        for x in xs:
            ours(x)
    names = names_of(labels)
    for name in dict.fromkeys(names):  # each domain: one update from all its samples of the three batches
        index = torch.tensor([i for i, n in enumerate(names) if n == name])
        with bnctl.domain(want, name), torch.no_grad():
            want[:2](torch.cat([x[index] for x in xs]))  # (the first layer alone: the pool is per layer)
    for k in ("1.running_mean", "1.running_var", "1.running_mean__target", "1.running_var__night"):
        torch.testing.assert_close(ours.state_dict()[k], want.state_dict()[k], rtol=0, atol=1e-12, msg=k)


def test_a_folded_model_runs_a_mixed_batch_unfolded_and_right():
    ours, want = mixed_net(policy="frozen_stats"), mixed_net(policy="frozen_stats")
    handle = bnctl.fold(ours)
    x, labels = data(10, seed=3).double(), LABELS["shuffled names"]
    with bnctl.domain(ours, labels):
        out = ours(x)
    expected = per_domain(want, x.clone().requires_grad_(), labels, torch.zeros(10, 3, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert any("mixed-domain batch" in pair.reason for pair in handle.pairs)


def test_a_single_domain_block_inside_a_mixed_one_wins_and_the_mixed_one_comes_back():
    model = mixed_net()
    with bnctl.domain(model, LABELS["sorted names"]):
        with bnctl.domain(model, "night"):
            model(data(4).double())
            assert int(model[1].num_batches_tracked) == int(model[1].num_batches_tracked__night)
        assert model[1]._bnctl.routing is not None
    assert model[1]._bnctl.routing is None


def test_report_shows_a_mixed_block():
    model = mixed_net()
    with bnctl.domain(model, ["target", "night"] * 5):
        assert bnctl.report(model).layers[0].domain == "mixed(target, night)"
        assert "mixed(target, night)" in str(bnctl.report(model))


def _unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("labels, message", [
    (["default"] * 9, r"^1: expected one domain label per sample, got 9 labels for a batch of 10"),
    (torch.tensor([0, 1] * 6), r"^1: expected one domain label per sample, got 12 labels"),
])
def test_labels_of_the_wrong_length_name_the_layer_and_change_nothing(labels, message):
    model = mixed_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message), bnctl.domain(model, labels):
        model(data(10).double())
    _unchanged(model, before)


@pytest.mark.parametrize("labels, message", [
    (["default", "day"] * 5, r"expected a domain of the model, got 'day'. Known domains: \['default', 'night', "),
    (torch.tensor([0, 3] * 5), r"^1: expected domain indices in \[0, 3\) \(its domains are \['default', 'target', "
                               r"'night'\]\), got 3"),
    (torch.tensor([0, -1] * 5), r"got -1"),
    (torch.tensor([0.0, 1.0] * 5), r"got a torch.float32 tensor of shape \(10,\). Use labels.long\(\)"),
    (torch.tensor([True, False] * 5), r"got a torch.bool tensor"),
    (torch.zeros(10, 1, dtype=torch.long), r"got a torch.int64 tensor of shape \(10, 1\)"),
    ([0, 1] * 5, r"got list"),
])
def test_bad_labels_are_refused_before_anything_runs(labels, message):
    model = mixed_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message), bnctl.domain(model, labels):
        model(data(10).double())
    _unchanged(model, before)


def test_labels_on_another_device_than_the_batch_name_the_layer():
    model = mixed_net().to("meta")
    with pytest.raises(ValueError, match=r"^1: expected the domain labels on the batch's device \(meta\), got them "
                                         r"on cpu. Pass labels.to\(x.device\)"), \
            bnctl.domain(model, torch.tensor([0, 1] * 5)):
        model(torch.empty(10, 2, 5, 5, dtype=torch.float64, device="meta"))


def test_a_mixed_batch_is_not_activation_checkpointed_silently():
    model = mixed_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"^1: a mixed-domain batch .* cannot be activation-checkpointed"), \
            bnctl.domain(model, LABELS["shuffled names"]):
        torch.utils.checkpoint.checkpoint(model, data(10).double().requires_grad_(), use_reentrant=False,
                                          context_fn=bnctl.checkpoint_context(model))
    _unchanged(model, before)
