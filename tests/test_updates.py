"""Controlled updates: snapshot/restore, accumulate, checkpoint_context."""

import copy
import warnings

import pytest
import torch
from test_recalibrate import data, make_model
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnctl


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
