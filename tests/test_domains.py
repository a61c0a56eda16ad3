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
