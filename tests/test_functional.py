"""The functional core: statistics, updates, the non-finite guard."""

import pytest
import torch

from bnctl import Mode
from bnctl.functional import (
    Accumulator,
    _commit,
    batch_norm,
    batch_stats,
    cumulative_update_,
    ema_update_,
)


@pytest.mark.parametrize("host_check", [True, False])
def test_commit_all_or_nothing(host_check):
    a, b = torch.zeros(3), torch.ones(3)
    nbt = torch.tensor(4)
    ok = _commit([a, b], torch.tensor([2.0, 2.0, 2.0, 1.0, float("nan"), 1.0]), nbt, host_check)
    assert not bool(ok)
    assert torch.equal(a, torch.zeros(3)) and torch.equal(b, torch.ones(3)) and int(nbt) == 4
    ok = _commit([a, b], torch.tensor([2.0] * 3 + [3.0] * 3), nbt, host_check)
    assert bool(ok) and torch.equal(a, torch.full((3,), 2.0)) and int(nbt) == 5
    for bad in (float("inf"), -float("inf"), 1e308):  # an overflowing float64 sum counts too
        ok = _commit([a, b], torch.tensor([bad] * 6, dtype=torch.float64), nbt, host_check)
        assert not bool(ok) and torch.equal(a, torch.full((3,), 2.0)) and int(nbt) == 5


def test_ema_update_formula_float64():
    x = torch.randn(16, 4, 3, dtype=torch.float64)
    stats = batch_stats(x)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 1
    rm0, rv0 = rm.clone(), rv.clone()
    ema_update_(rm, rv, None, stats, 0.3)
    n = 48
    torch.testing.assert_close(rm, 0.7 * rm0 + 0.3 * x.mean((0, 2)))
    torch.testing.assert_close(rv, 0.7 * rv0 + 0.3 * x.var((0, 2), unbiased=False) * n / (n - 1))


def test_cumulative_update_is_exact_and_split_invariant():
    data = torch.randn(60, 3, 5, dtype=torch.float64) * 4 + 2
    results = []
    for splits in ([60], [10] * 6, [7, 13, 40]):
        rm, rv, nbt = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
        acc = Accumulator.empty(3)
        for chunk in torch.split(data, splits):
            cumulative_update_(rm, rv, nbt, batch_stats(chunk), acc)
        assert int(nbt) == len(splits)
        results.append((rm, rv))
    want_mean = data.mean((0, 2))
    want_var = data.transpose(0, 1).reshape(3, -1).var(1, unbiased=True)
    for rm, rv in results:
        torch.testing.assert_close(rm, want_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, want_var, rtol=1e-12, atol=1e-12)


def test_cumulative_skips_non_finite_batch_and_keeps_accumulator():
    rm, rv, nbt = torch.zeros(2), torch.ones(2), torch.tensor(0)
    acc = Accumulator.empty(2)
    good = torch.randn(8, 2)
    cumulative_update_(rm, rv, nbt, batch_stats(good), acc)
    bad = torch.randn(8, 2)
    bad[0, 0] = float("nan")
    assert not bool(cumulative_update_(rm, rv, nbt, batch_stats(bad), acc))
    assert int(nbt) == 1 and float(acc.count) == 8
    torch.testing.assert_close(rm, good.mean(0))


def test_running_mode_needs_running_stats():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        batch_norm(torch.randn(4, 3), None, None, mode=Mode("running", "none"))
