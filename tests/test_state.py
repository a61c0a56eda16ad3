"""Per-layer state: the plan, the tensors of a domain, what a forward does under each scope."""

import warnings

import pytest
import torch
from torch import nn

import bnctl
from bnctl.functional import Accumulator, BatchStats
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


def controlled(policy="torch", **kwargs):
    bn = bnctl.BatchNorm2d(3, policy=policy, **kwargs)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.num_batches_tracked.fill_(5)
    return bn, bn._bnctl


def test_plan_is_resolved_again_only_when_an_input_to_it_changes():
    bn, state = controlled()
    plan = state.plan(bn)
    assert state.plan(bn) is plan and plan.train.momentum == 0.1
    bn.momentum = 0.3
    assert state.plan(bn).train.momentum == 0.3
    bn.track_running_stats = False
    assert state.plan(bn).train.update == "none"
    bn.track_running_stats = True
    with bnctl.using(bn, "frozen"):
        assert state.plan(bn).train.normalize == "running"
    assert state.plan(bn).train.normalize == "batch"


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


def test_begin_under_no_update_and_pools():
    bn, state = controlled()
    bn.train()
    x = torch.randn(4, 3, 2, 2)
    forward = state.begin(bn, x)
    assert forward.step.update == "ema" and forward.ema_weight == 0.1  # the native kernel's EMA
    state.no_update += 1
    assert state.begin(bn, x).step.update == "none"
    state.no_update -= 1
    state.pools = Pools()
    forward = state.begin(bn, x)
    assert forward.step.update == "ema" and forward.ema_weight is None  # statistics, for the pool
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        state.begin(bn, torch.randn(1, 3, 1, 1))


def test_commit_into_pools_is_guarded_and_per_domain():
    bn, state = controlled()
    state.pools = Pools()
    forward = state.begin(bn.train(), torch.randn(4, 3, 2, 2))
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
    assert state.write(DEFAULT, t, "cumulative", None, stats) is True
    assert torch.equal(bn.running_mean, torch.full((3,), 2.0)) and int(bn.num_batches_tracked) == 6
    assert set(state.accumulators) == {DEFAULT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert state.write(DEFAULT, t, "ema", 0.1, stats._replace(n=1)) is False  # no unbiased variance
    assert state.counts.attempts == 2 and state.counts.skipped == 1


def test_tape_records_the_statistics_a_forward_normalized_with():
    bn, state = controlled("running_update")
    bn.train()
    tape = Tape()
    state.tapes.append(tape)
    before = bn.running_mean.clone()
    bn(torch.randn(4, 3, 2, 2))
    state.tapes.remove(tape)
    assert not torch.equal(bn.running_mean, before)  # the forward updated the buffers...
    state.replay = tape
    for _ in range(2):  # a recomputation may run twice (retain_graph=True): each starts again
        tape.rewind()
        replayed = state.begin(bn, torch.randn(4, 3, 2, 2))
        assert torch.equal(replayed.tensors.running_mean, before)  # ...the replay sees them as they were
    with pytest.raises(RuntimeError, match="recomputation ran this layer more often"):
        state.begin(bn, torch.randn(4, 3, 2, 2))


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
