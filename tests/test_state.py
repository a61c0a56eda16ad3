"""Per-layer state: the plan, the tensors of a domain, what a forward does under each scope."""

import warnings

import pytest
import torch
from torch import nn

import bnctl
from bnctl.policy import BATCH, EMA, NO_UPDATE, RUNNING
from bnctl.state import (
    DEFAULT,
    LayerTensors,
    Pools,
    Tape,
    UpdateCounts,
    domain_key,
    domains,
    never_updated,
)
from bnctl.stats import Accumulator, BatchStats


def controlled(policy="torch", **kwargs):
    bn = bnctl.BatchNorm2d(3, policy=policy, **kwargs)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.num_batches_tracked.fill_(5)
    return bn, bn._bnctl


def test_program_is_settled_again_only_when_an_input_to_it_changes():
    bn, state = controlled()
    bn.train()
    forward = state.decide(bn, None)
    program = state._programs.get(None)
    assert state.decide(bn, None) is forward and state._programs.get(None) is program  # one decision, kept
    assert (forward.normalize, forward.update, forward.step.momentum) == (BATCH, EMA, 0.1)
    bn.momentum = 0.3
    assert state.decide(bn, None).step.momentum == 0.3 and state._programs.get(None) is not program
    bn.track_running_stats = False
    assert state.decide(bn, None).update == NO_UPDATE
    bn.track_running_stats = True
    with bnctl.using(bn, "frozen"):
        assert state.decide(bn, None).normalize == RUNNING
    assert state.decide(bn, None).normalize == BATCH
    with bnctl.no_update(bn):
        assert state.decide(bn, None).update == NO_UPDATE
    bnctl.add_domains(bn, ["tgt"])
    with bnctl.domain(bn, "tgt"):
        assert state.decide(bn, None).keys[:3] == ("running_mean__tgt", "running_var__tgt",
                                                   "num_batches_tracked__tgt")
    assert state.decide(bn, None).keys[0] == "running_mean"
    assert (state.decide(bn.eval(), None).normalize, state.decide(bn, None).update) == (RUNNING, NO_UPDATE)
    bn.eps = 0.0  # checked at every forward, not settled (where batch statistics normalize, as PyTorch)
    x = torch.randn(4, 3, 2, 2)
    state.decide(bn, x)
    assert state.decide(bn.train(), None).normalize == BATCH  # (before the batch rules: no check)
    with pytest.raises(ValueError, match="expected eps > 0"):
        state.decide(bn, x)


def test_a_stale_program_is_never_used():
    """Every input to the decision that a user can change without bnctl seeing it, changed between two
    forwards of one layer: each forward matches a fresh layer that had it all along."""
    x = torch.randn(4, 3, 2, 2)
    bn = bnctl.BatchNorm2d(3, policy="torch").train()
    bn(x)
    for change in (lambda m: setattr(m, "momentum", 0.5), lambda m: setattr(m, "momentum", None),
                   lambda m: setattr(m, "track_running_stats", False), lambda m: m.eval()):
        fresh = bnctl.BatchNorm2d(3, policy="torch").train()
        fresh.load_state_dict(bn.state_dict())
        change(bn), change(fresh)
        fresh._bnctl._programs = {}
        assert torch.equal(bn(x), fresh(x))
        assert all(torch.equal(a, b) for a, b in zip(bn.state_dict().values(), fresh.state_dict().values()))


def test_policy_stack_is_last_in_first_out():
    bn, state = controlled("frozen_stats")
    first, second = object(), object()
    state.push(first, bnctl.PRESETS["torch"])
    state.push(second, bnctl.PRESETS["frozen"])
    assert state.policy.name == "frozen"
    with pytest.raises(RuntimeError, match="reverse order"):
        state.pop(first)
    state.pop(second), state.pop(first)
    assert state.policy.name == "frozen_stats"  # the base


def test_tensors_of_a_domain():
    bn = nn.BatchNorm1d(3)
    bnctl.add_domains(bn, ["a"])
    bnctl.add_domains(bn, ["b"], affine=True)
    assert domains(bn) == [DEFAULT, "a", "b"] and domain_key("running_var", "a") == "running_var__a"
    default, a, b = (LayerTensors.of(bn, d) for d in domains(bn))
    assert default.running_mean is bn.running_mean and a.running_mean is bn.running_mean__a
    assert a.weight is bn.weight and b.weight is bn.weight__b  # a shares the default affine


def test_decide_under_no_update_and_pools():
    bn, state = controlled()
    bn.train()
    x = torch.randn(4, 3, 2, 2)
    forward = state.decide(bn, x)
    assert forward.update == EMA and forward.staged  # the kernel computes the EMA
    state.no_update += 1
    assert state.decide(bn, x).update == NO_UPDATE
    state.no_update -= 1
    state.pools = Pools()
    forward = state.decide(bn, x)
    assert forward.update == EMA and forward.pool and not forward.staged  # statistics, for the pool
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        state.decide(bn, torch.randn(1, 3, 1, 1))


def test_commit_into_pools_is_guarded_and_per_domain():
    bn, state = controlled()
    state.pools = Pools()
    forward = state.decide(bn.train(), torch.randn(4, 3, 2, 2))
    stats = BatchStats(torch.ones(3), torch.full((3,), 2.0), 8)
    state.commit(bn, forward, stats)
    state.commit(bn, forward._replace(domain="other"), stats)
    with pytest.warns(RuntimeWarning, match="skipped"):
        state.commit(bn, forward, BatchStats(torch.full((3,), float("nan")), torch.ones(3), 8))
    assert set(state.pools.by_domain) == {DEFAULT, "other"}
    assert float(state.pools.by_domain[DEFAULT].count) == 8 and state.counts.skipped == 1
    assert int(bn.num_batches_tracked) == 5  # nothing written to the buffers


def test_write_counts_and_the_cumulative_accumulator_is_per_domain():
    bn, state = controlled()
    t = state.tensors(bn)
    stats = BatchStats(torch.full((3,), 2.0), torch.ones(3), 4)
    assert state.write(DEFAULT, t, True, None, stats) is True
    assert torch.equal(bn.running_mean, torch.full((3,), 2.0)) and int(bn.num_batches_tracked) == 6
    assert set(state.accumulators) == {DEFAULT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert state.write(DEFAULT, t, False, 0.1, stats._replace(n=1)) is False  # no unbiased variance
    assert state.counts.attempts == 2 and state.counts.skipped == 1


def test_tape_records_the_statistics_a_forward_normalized_with():
    bn, state = controlled("running_update")
    bn.train()
    tape = Tape()
    state.tapes = [tape]
    before = bn.running_mean.clone(), bn.running_var.clone()
    bn(torch.randn(4, 3, 2, 2))
    state.tapes = []
    assert not torch.equal(bn.running_mean, before[0])  # the forward updated the buffers...
    after = bn.running_mean.clone(), bn.running_var.clone()
    state.replay = tape
    for _ in range(2):  # a recomputation may run twice (retain_graph=True): each starts again
        tape.rewind()
        x = torch.randn(4, 3, 2, 2)
        want = torch.nn.functional.batch_norm(x, before[0], before[1], bn.weight, bn.bias, False, 0.0, bn.eps)
        assert torch.equal(bn(x), want)  # ...the replay normalizes with them as they were
        assert torch.equal(bn.running_mean, after[0]) and torch.equal(bn.running_var, after[1])  # writes nothing
    with pytest.raises(RuntimeError, match="recomputation ran this layer more often"):
        bn(torch.randn(4, 3, 2, 2))


def test_a_policy_applied_and_removed_keeps_the_cumulative_average_under_it():
    bn = nn.BatchNorm1d(2)
    bnctl.apply(bn, "recalibrate")
    xs = [torch.randn(8, 2) + i for i in range(4)]
    for x in xs[:3]:
        bn(x)
    with bnctl.using(bn, "frozen"):
        bn(xs[0])
    bn(xs[3])
    torch.testing.assert_close(bn.running_mean, torch.cat(xs).mean(0))


def test_update_counts_on_device_flags():
    counts = UpdateCounts()
    counts.add(True)
    counts.add(torch.tensor(False))
    counts.add(torch.tensor(True))
    assert isinstance(counts.applied, torch.Tensor) and counts.attempts == 3 and counts.skipped == 1


def test_never_updated():
    assert never_updated(torch.zeros(3), torch.ones(3), torch.tensor(0))
    assert never_updated(torch.zeros(3), torch.ones(3), None)
    assert not never_updated(torch.zeros(3), torch.ones(3), torch.tensor(2))
    assert not never_updated(torch.zeros(3), torch.full((3,), 2.0), 0)
    assert not never_updated(None, None, None)


def test_accumulator_made_under_inference_mode_is_a_normal_tensor():
    bn, state = controlled("recalibrate")
    with torch.inference_mode():
        bn(torch.randn(4, 3, 2, 2))
    acc = state.accumulators[DEFAULT]
    assert isinstance(acc, Accumulator) and not acc.mean.is_inference()


def test_copies_keep_the_policy_but_not_the_scopes_of_the_original():
    import copy

    bn = nn.BatchNorm1d(3).train()
    bnctl.add_domains(bn, "tgt")
    bnctl.apply(bn, "running_update")
    with bnctl.no_update(bn), bnctl.accumulate(bn), bnctl.domain(bn, "tgt"):
        twin = copy.deepcopy(bn)
    twin(torch.randn(8, 3))
    assert twin.policy.name == "running_update"
    assert int(twin.num_batches_tracked) == 1 and int(twin.num_batches_tracked__tgt) == 0


@pytest.mark.parametrize("when", ["before the first forward", "after forwards"])
def test_unfreezing_a_frozen_layer_warns_once_naming_the_layer_and_the_fix(when):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    bnctl.apply(model, "frozen")
    x = torch.randn(4, 3, 6, 6)
    if when == "after forwards":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # flags that agree with the policy: silent
            model(x).mean().backward()
    model[1].weight.requires_grad_(True)  # what Lightning's BaseFinetuning.make_trainable does
    with pytest.warns(UserWarning, match=r"^1: weight has requires_grad=True, but policy 'frozen'.*handle.remove"):
        model(x).mul(torch.randn(4, 4, 4, 4)).sum().backward()
    assert model[1].weight.grad is None  # frozen means frozen
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer
        model(x).mean().backward()


def test_requires_grad_that_agrees_with_the_policy_never_warns():
    for policy in ("frozen_stats", "torch", "test_time"):
        bn = nn.BatchNorm2d(3).train()
        bnctl.apply(bn, policy)
        bn.weight.requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bn(torch.randn(4, 3, 2, 2)).mean().backward()
