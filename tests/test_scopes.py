"""Scopes and snapshots: snapshot/restore, accumulate, checkpoint_context (bnctl.scopes, bnctl.snapshots)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnctl
from conftest import BatchNormAct1d, BatchNormAct2d, data, make_model


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("preset", ["torch", "running_update", "renorm"])
def test_accumulate_equals_one_update_with_pooled_batch(preset, momentum):
    ref = nn.BatchNorm2d(3, momentum=momentum).double()
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.num_batches_tracked.fill_(7)
    bn = copy.deepcopy(ref)
    bnctl.apply(bn, preset)
    ref_policy = copy.deepcopy(ref)
    bnctl.apply(ref_policy, preset)
    x = torch.randn(24, 3, 4, 4, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        ref_policy.train()(x)  # one update with the pooled batch
        outs = []
        with bnctl.accumulate(bn):
            for micro in x.split([5, 7, 12]):
                outs.append(bn.train()(micro))
                assert int(bn.num_batches_tracked) == 7  # nothing written until the end
    torch.testing.assert_close(bn.running_mean, ref_policy.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref_policy.running_var, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 8
    # inside the block each micro-batch was normalized as it would be outside it
    fresh = copy.deepcopy(ref)
    bnctl.apply(fresh, preset)
    with torch.no_grad(), bnctl.no_update(fresh):
        torch.testing.assert_close(outs[0], fresh.train()(x[:5]))


def test_accumulate_commits_nothing_on_error_and_restores():
    model = make_model().train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        with bnctl.accumulate(model):
            model(data(8))
            raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert type(model[1]) is nn.BatchNorm2d


def test_accumulate_leaves_out_non_finite_micro_batch():
    bn = nn.BatchNorm1d(2).train()
    good = [torch.randn(8, 2), torch.randn(8, 2)]
    bad = torch.randn(8, 2)
    bad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bnctl.accumulate(bn):
            bn(good[0]), bn(bad), bn(good[1])
    assert any("skipped" in str(w.message) for w in caught)
    ref = nn.BatchNorm1d(2).train()
    ref(torch.cat(good))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert int(bn.num_batches_tracked) == 1


def test_checkpoint_recompute_updates_once():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    plain = copy.deepcopy(block)
    naive = copy.deepcopy(block)
    x = torch.randn(8, 4, requires_grad=True)
    g = torch.randn(8, 4)  # random upstream gradient: a sum would make BN's gradient ~0
    plain(x).backward(g)
    y = checkpoint(block, x, use_reentrant=False, context_fn=bnctl.checkpoint_context(block))
    y.backward(g)
    checkpoint(naive, x, use_reentrant=False).backward(g)
    assert int(naive[1].num_batches_tracked) == 2  # the problem: recompute updates again
    assert int(block[1].num_batches_tracked) == 1
    assert torch.equal(block[1].running_mean, plain[1].running_mean)
    assert torch.equal(block[1].running_var, plain[1].running_var)
    assert torch.equal(block[0].weight.grad, plain[0].weight.grad)
    assert type(block[1]) is nn.BatchNorm1d


def test_snapshot_restore_by_name():
    model = make_model()
    saved = bnctl.snapshot(model)
    model.train()(data(8))
    assert int(model[1].num_batches_tracked) == 1
    bnctl.restore(model, saved)
    assert int(model[1].num_batches_tracked) == 0
    with pytest.raises(ValueError, match="missing"):
        bnctl.restore(nn.Sequential(nn.BatchNorm1d(3)), saved)


def test_restore_into_a_layer_of_another_width_names_it_and_writes_nothing():
    saved = bnctl.snapshot(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)))
    other = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(5))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"^2: the snapshot's running_mean has shape \(3,\), the layer's \(5,\)"):
        bnctl.restore(other, saved)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), before.values()))  # not even layer 1


def test_snapshots_carry_across_a_frozen_batchnorm_stand_in():
    """Taken before apply and restored under it, or taken under it and restored after remove()."""
    from conftest import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].weight.uniform_(0.5, 1.5)
    original = {k: v.clone() for k, v in model[1].state_dict().items()}
    before = bnctl.snapshot(model)
    handle = bnctl.apply(model, "frozen_stats")
    with torch.no_grad():
        model[1].running_mean.add_(1.0), model[1].weight.mul_(2.0)
    bnctl.restore(model, before)  # the frozen layer's weight buffer is the stand-in's weight
    assert torch.equal(model[1].running_mean, original["running_mean"])
    assert torch.equal(model[1].weight, original["weight"])
    with torch.no_grad():
        model[1].running_var.mul_(3.0)
    during = bnctl.snapshot(model)  # holds the stand-in's num_batches_tracked
    with torch.no_grad():
        model[1].running_var.fill_(7.0)
    handle.remove()
    bnctl.restore(model, during)
    assert torch.equal(model[1].running_var, original["running_var"] * 3.0)


def test_removing_a_stand_in_that_holds_domains_is_refused_before_anything_changes():
    from conftest import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3))
    handle = bnctl.apply(model, "frozen")
    stand_in = model[1]
    bnctl.add_domains(model, "target")
    with pytest.raises(ValueError, match=r"^1: the bnctl.BatchNorm2d standing in for a FrozenBatchNorm2d holds "
                                         r"domain\(s\) \['target'\].*export_domain.*remove_domains"):
        handle.remove()
    assert model[1] is stand_in and stand_in.policy.name == "frozen"
    bnctl.remove_domains(model)
    handle.remove()
    assert type(model[1]) is FrozenBatchNorm2d


# -- checkpoint recomputation sees exactly what the first forward saw ----------------------

CHECKPOINT_POLICIES = {
    "torch": "torch",
    "running_update": "running_update",
    "renorm after warm-up": bnctl.Policy("renorm", "ema", renorm_warmup=(0, 0), rmax=1.5, dmax=0.5),
    "blend with ema": bnctl.Policy(0.5, "ema"),
    "cumulative": bnctl.Policy("batch", "cumulative"),
}


@pytest.mark.parametrize("policy", list(CHECKPOINT_POLICIES.values()), ids=list(CHECKPOINT_POLICIES))
def test_checkpoint_recompute_is_exact_for_every_update(policy):
    """The recomputation normalizes with the statistics of the first forward, not the updated ones."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    block = block.double().train()
    with torch.no_grad():
        for bn in (block[1], block[4]):
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.2, 3)
    bnctl.apply(block, policy)
    plain = copy.deepcopy(block)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(2):  # the second step normalizes with statistics the first one updated
        xp = x.detach().clone().requires_grad_()
        plain(xp).backward(g)
        xc = x.detach().clone().requires_grad_()
        checkpoint(block, xc, use_reentrant=False, context_fn=bnctl.checkpoint_context(block)).backward(g)
        torch.testing.assert_close(xc.grad, xp.grad, rtol=1e-12, atol=1e-12)
        for (name, p), q in zip(block.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
        for (name, a), b in zip(block.state_dict().items(), plain.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_checkpoint_context_checks_layers_up_front_and_accepts_exclude():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3), nn.BatchNorm2d(3)).train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"^1: .*exclude="):
        bnctl.checkpoint_context(model)  # before any forward updated anything
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    fn = bnctl.checkpoint_context(model, exclude="1")
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    checkpoint(model, x, use_reentrant=False, context_fn=fn).backward(torch.randn(4, 3, 2, 2))
    assert int(model[2].num_batches_tracked) == 1


# -- accumulate: per domain, scopes compose --------------------------------------------------


def test_accumulate_pools_per_domain():
    bn = nn.BatchNorm1d(3).train()
    bnctl.add_domains(bn, "tgt")
    src, tgt = torch.randn(16, 3), torch.randn(16, 3) * 3 + 10
    with bnctl.accumulate(bn):
        bn(src[:8])
        with bnctl.domain(bn, "tgt"):
            bn(tgt[:8]), bn(tgt[8:])
        bn(src[8:])
    ref_src, ref_tgt = nn.BatchNorm1d(3).train(), nn.BatchNorm1d(3).train()
    ref_src(src), ref_tgt(tgt)
    torch.testing.assert_close(bn.running_mean, ref_src.running_mean)
    torch.testing.assert_close(bn.running_var__tgt, ref_tgt.running_var)
    assert int(bn.num_batches_tracked) == 1 and int(bn.num_batches_tracked__tgt) == 1


def test_nested_accumulate_is_refused_up_front_and_the_outer_block_still_commits():
    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(8, 3)
    with bnctl.accumulate(bn):
        bn(x)
        with pytest.raises(RuntimeError, match="enclosing bnctl.accumulate"):
            with bnctl.accumulate(bn):
                pass
    ref = nn.BatchNorm1d(3).train()
    ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert type(bn) is nn.BatchNorm1d


def test_policy_applied_inside_accumulate_pools_too():
    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(16, 3)
    with bnctl.accumulate(bn):
        with bnctl.using(bn, "running_update"):
            bn(x[:8])
            assert int(bn.num_batches_tracked) == 0  # pooled, not written
            bn(x[8:])
    assert int(bn.num_batches_tracked) == 1
    ref = nn.BatchNorm1d(3).train()
    ref(x)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert type(bn) is nn.BatchNorm1d


def test_accumulate_and_no_update_accept_exclude_for_layers_bnctl_cannot_control():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3), nn.BatchNorm2d(3)).train()
    for scope in (bnctl.accumulate, bnctl.no_update):
        with pytest.raises(TypeError, match=r"^1: .*exclude="):
            with scope(model):
                pass
        with scope(model, exclude="1"):
            model(torch.randn(4, 3, 2, 2))


def test_snapshot_of_uninitialized_lazy_layer_names_it():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"^1: expected a materialized layer"):
        bnctl.snapshot(model)


@pytest.mark.parametrize("policy", ["torch", "running_update"])
def test_nested_checkpoints_update_once_with_exact_gradients(policy):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double().train()
    outer_bn = nn.BatchNorm1d(4).double().train()
    both = nn.ModuleList([inner, outer_bn])
    with torch.no_grad():
        for bn in (inner[1], outer_bn):
            bn.running_mean.uniform_(-2, 2)
    bnctl.apply(both, policy)
    plain = copy.deepcopy(both)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(8, 4, dtype=torch.float64)

    def outer_fn(t):
        return outer_bn(checkpoint(inner, t, use_reentrant=False, context_fn=bnctl.checkpoint_context(inner)))

    checkpoint(outer_fn, x, use_reentrant=False, context_fn=bnctl.checkpoint_context(both)).backward(g)
    xp = x.detach().clone().requires_grad_()
    plain[1](plain[0](xp)).backward(g)
    assert int(inner[1].num_batches_tracked) == 1 and int(outer_bn.num_batches_tracked) == 1
    torch.testing.assert_close(x.grad, xp.grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(both.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_checkpoint_recomputation_can_run_twice():
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    bnctl.apply(block, "running_update")
    x = torch.randn(8, 4, requires_grad=True)
    y = checkpoint(block, x, use_reentrant=False, context_fn=bnctl.checkpoint_context(block))
    g = torch.randn(8, 4)
    y.backward(g, retain_graph=True)
    first = x.grad.clone()
    y.backward(g)
    torch.testing.assert_close(x.grad, 2 * first)
    assert int(block[1].num_batches_tracked) == 1


def test_recalibrate_inside_accumulate_keeps_the_block():
    bn = nn.BatchNorm1d(3).train()
    x0, x1 = torch.randn(8, 3), torch.randn(8, 3)
    with bnctl.accumulate(bn):
        bn(x0)
        bnctl.recalibrate(bn, [torch.randn(8, 3) + 5])
        assert int(bn.num_batches_tracked) == 1  # the recalibration, written explicitly
        bn(x1)
        assert int(bn.num_batches_tracked) == 1  # pooled, as before it
    assert int(bn.num_batches_tracked) == 2 and type(bn) is nn.BatchNorm1d


def test_recalibrate_inside_no_update_is_an_explicit_write():
    model = make_model().train()
    with bnctl.no_update(model):
        assert bnctl.recalibrate(model, [data(8)]) == ["1", "5"]
        model(data(8))
    assert int(model[1].num_batches_tracked) == 1  # the recalibration only


def test_revert_inside_accumulate_commits_nothing_into_the_plain_layer():
    bn = nn.BatchNorm1d(3).train()
    with bnctl.accumulate(bn):
        bn(torch.randn(8, 3))
        bnctl.revert(bn)
    assert int(bn.num_batches_tracked) == 0 and type(bn) is nn.BatchNorm1d


def test_copies_made_inside_a_scope_are_plain_when_only_the_scope_held_the_layer(tmp_path):
    model = make_model().train()
    with bnctl.no_update(model), bnctl.accumulate(model):
        twin = copy.deepcopy(model)
        torch.save(model, tmp_path / "m.pt")
    assert type(twin[1]) is nn.BatchNorm2d and "_bnctl" not in twin[1].__dict__
    assert type(torch.load(tmp_path / "m.pt", weights_only=False)[1]) is nn.BatchNorm2d
    twin(data(8))
    assert int(twin[1].num_batches_tracked) == 1


def test_unchanged_restores_each_layer_its_own_buffers():
    """A lazy layer materialized by the forward must not shift which saved buffers go where."""
    model = nn.Sequential(nn.LazyBatchNorm1d(), BatchNormAct1d(3), nn.BatchNorm1d(3)).train()
    with torch.no_grad():
        model[1].running_mean.fill_(7.0)
    bnctl.recalibrate(model, [torch.randn(8, 3)], layers="2")
    assert torch.equal(model[1].running_mean, torch.full((3,), 7.0)) and int(model[1].num_batches_tracked) == 0
    assert not torch.equal(model[0].running_mean, torch.full((3,), 7.0))
