"""The functional core: statistics, normalization of every mode and its gradient, update rules,
the non-finite guard."""

import math

import pytest
import torch

from bnctl import Mode, context
from bnctl.functional import batch_norm, normalize
from bnctl.guard import copy_if_finite_, keep_if_finite_
from bnctl.policy import BATCH, BLEND, EMA, NO_UPDATE, RENORM, RUNNING, check_eps, for_batch
from bnctl.stats import Accumulator, BatchAverage, BatchStats, batch_stats, ema, new_running_values
from conftest import MODES, RENORM_LIMITS, TOL, make_inputs, ours, reference_bn

SHAPES = [(2, 3), (2, 3, 1, 1), (2, 3, 1), (3, 2, 2, 3), (2, 2, 1, 2, 2)]

# -- the guard: both paths, chosen by where it runs (bnctl.context) -------------------------


def _host(targets, values, counters):
    return copy_if_finite_(targets, values, *counters[:1] or [None], ctx=context.EAGER)


def _masked(targets, values, counters):  # what compiled, exported and vmapped code (and CUDA) run
    return copy_if_finite_(targets, values, *counters[:1] or [None], ctx=context.COMPILING)


GUARDS = [_host, _masked]


@pytest.mark.parametrize("guard", GUARDS, ids=["host", "device"])
def test_guard_writes_all_or_nothing(guard):
    a, b = torch.zeros(3), torch.ones(3)
    nbt = torch.tensor(4)
    ok = guard([a, b], torch.tensor([2.0, 2.0, 2.0, 1.0, float("nan"), 1.0]), [nbt])
    assert not bool(ok)
    assert torch.equal(a, torch.zeros(3)) and torch.equal(b, torch.ones(3)) and int(nbt) == 4
    ok = guard([a, b], torch.tensor([2.0] * 3 + [3.0] * 3), [nbt])
    assert bool(ok) and torch.equal(a, torch.full((3,), 2.0)) and int(nbt) == 5
    for bad in (float("inf"), -float("inf"), float("nan")):
        ok = guard([a, b], torch.tensor([bad] * 6, dtype=torch.float64), [nbt])
        assert not bool(ok) and torch.equal(a, torch.full((3,), 2.0)) and int(nbt) == 5


@pytest.mark.parametrize("guard", GUARDS, ids=["host", "masked"])
def test_guard_is_exact_where_a_fast_sum_overflows(guard):
    """Finite values whose sum overflows are finite: the host path's one-sum check falls back to an
    exact check rather than skipping a legitimate update."""
    a = torch.zeros(4, dtype=torch.float64)
    big = torch.tensor([1e308, 1e308, -1e308, 1e308], dtype=torch.float64)
    assert math.isinf(big.sum())
    assert bool(guard([a], big, []))
    assert torch.equal(a, big)


def test_keep_if_finite_restores_the_buffers_from_the_backup():
    rm, rv, nbt = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor(7)
    backup = torch.stack([rm, rv]).clone()
    rm.fill_(5.0), rv.fill_(1e38)  # a kernel wrote finite values whose dot product overflows
    assert keep_if_finite_(rm, rv, nbt, backup) is True and int(nbt) == 8
    rv[1] = float("nan")
    assert keep_if_finite_(rm, rv, nbt, backup) is False and int(nbt) == 8
    assert torch.equal(torch.stack([rm, rv]), backup)


def test_guard_checks_the_values_as_rounded_to_each_buffer():
    """A float16 running_var beside a float32 running_mean: 600**2/2 overflows float16, so nothing is written."""
    rm, rv, nbt = torch.zeros(2), torch.ones(2, dtype=torch.half), torch.tensor(0)
    batch_norm(torch.tensor([[0.0, 0], [1.0, 600.0]]), rm, rv, mode=Mode("renorm", "ema"), momentum=1.0,
               num_batches_tracked=nbt)
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2, dtype=torch.half)) and int(nbt) == 0
    batch_norm(torch.tensor([[0.0, 0], [1.0, 6.0]]), rm, rv, mode=Mode("renorm", "ema"), momentum=1.0,
               num_batches_tracked=nbt)
    assert torch.isfinite(rv).all() and float(rv[1]) == 18.0 and int(nbt) == 1


def test_guard_host_path_returns_bool_masked_path_tensor():
    a = torch.zeros(2)
    assert _host([a], torch.ones(2), []) is True
    flag = _masked([a], torch.ones(2), [])
    assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and flag.dim() == 0


# -- update rules ---------------------------------------------------------------------------


def test_ema_formula_float64():
    x = torch.randn(16, 4, 3, dtype=torch.float64)
    stats = batch_stats(x)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 1
    new = ema(rm, rv, stats, 0.3)
    n = 48
    torch.testing.assert_close(new[0], 0.7 * rm + 0.3 * x.mean((0, 2)))
    torch.testing.assert_close(new[1], 0.7 * rv + 0.3 * x.var((0, 2), unbiased=False) * n / (n - 1))


def test_ema_of_one_value_is_undefined_not_an_error():
    new = ema(torch.zeros(2), torch.ones(2), BatchStats(torch.ones(2), torch.zeros(2), 1), 0.1)
    assert torch.isfinite(new[0]).all() and torch.isnan(new[1]).all()


def _write(targets, values, nbt):
    return copy_if_finite_(targets, values, nbt)


def test_cumulative_update_is_exact_and_split_invariant():
    data = torch.randn(60, 3, 5, dtype=torch.float64) * 4 + 2
    results = []
    for splits in ([60], [10] * 6, [7, 13, 40]):
        rm, rv, nbt = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
        acc = Accumulator.empty(3)
        for chunk in torch.split(data, splits):
            _write(*new_running_values(True, rm, rv, nbt, batch_stats(chunk), None, acc), nbt)
        assert int(nbt) == len(splits) and int(acc.batches) == len(splits)
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
    _write(*new_running_values(True, rm, rv, nbt, batch_stats(good), None, acc), nbt)
    bad = torch.randn(8, 2)
    bad[0, 0] = float("nan")
    assert not _write(*new_running_values(True, rm, rv, nbt, batch_stats(bad), None, acc), nbt)
    assert int(nbt) == 1 and float(acc.count) == 8
    torch.testing.assert_close(rm, good.mean(0))


def test_batch_average_is_the_mean_of_per_batch_statistics():
    batches = [torch.randn(8, 3, dtype=torch.float64) + i for i in range(4)]
    avg = BatchAverage.empty(3)
    for b in batches:
        copy_if_finite_(avg.tensors, torch.cat(avg.merged(batch_stats(b))), None)
    mean, var = avg.population()
    torch.testing.assert_close(mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(var, torch.stack([b.var(0) for b in batches]).mean(0))
    assert int(avg.batches) == 4 and int(avg.count) == 32


def test_accumulator_as_one_batch():
    x = torch.randn(20, 3, dtype=torch.float64)
    acc = Accumulator.empty(3)
    for chunk in x.split([6, 14]):
        copy_if_finite_(acc.tensors, torch.cat(acc.merged(batch_stats(chunk))), None)
    pooled = acc.as_batch()
    assert pooled.n == 20
    torch.testing.assert_close(pooled.var, x.var(0, unbiased=False))


# -- which statistics normalize, and their gradients ------------------------------------------


def test_batch_rules():
    rules = dict(fallback=False, has_running_stats=True, name="bn", got="1")
    assert for_batch(BATCH, EMA, 0, **rules) == (BATCH, NO_UPDATE)
    assert for_batch(RUNNING, EMA, 0, **rules) == (RUNNING, NO_UPDATE)
    assert for_batch(BATCH, EMA, 2, **rules) == (BATCH, EMA)
    assert for_batch(RUNNING, EMA, 1, **rules) == (RUNNING, EMA)  # attempted; the guard skips it
    for how in (BATCH, RENORM, BLEND):
        with pytest.raises(ValueError, match=r"^bn: expected more than 1 value per channel.*got 1\. Fixes"):
            for_batch(how, EMA, 1, **rules)
    assert for_batch(BATCH, EMA, 1, **{**rules, "fallback": True}) == (RUNNING, NO_UPDATE)
    with pytest.raises(ValueError, match="more than 1 value"):  # nothing to fall back to
        for_batch(BATCH, EMA, 1, **{**rules, "fallback": True, "has_running_stats": False})
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match=r"^bn: expected eps > 0"):
            check_eps(eps, "bn")
    check_eps(1e-5, "bn")


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(mode, shape, affine):
    x, rm, rv, w, b = make_inputs(shape, affine=affine)
    if mode[0] == "renorm":
        # r and d are constants in backward by definition (a stop-gradient), so the numerical
        # Jacobian only agrees where both are clipped: far-off running statistics ensure it.
        rm, rv = rm + 10.0, rv + 100.0
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*args):
        x_, *rest = args
        w_, b_ = (rest + [None, None])[:2] if affine else (None, None)
        return ours(x_, rm, rv, w_, b_, mode)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (4, 3, 5, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_autograd_random_upstream(mode, shape, dtype):
    x, rm, rv, w, b = make_inputs(shape, dtype)
    y = ours(x, rm, rv, w, b, mode)
    g = torch.randn_like(y)  # never .sum(): it hides BatchNorm gradient errors
    got = torch.autograd.grad(y, (x, w, b), g)
    ref_y = reference_bn(x, rm, rv, w, b, mode[0], rmax=RENORM_LIMITS[0], dmax=RENORM_LIMITS[1])
    want = torch.autograd.grad(ref_y, (x, w, b), g)
    torch.testing.assert_close(y, ref_y, **TOL[dtype])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL[dtype])


@pytest.mark.parametrize("mode", [m for m in MODES if m[0] != "renorm"], ids=str)
def test_double_backward_matches_reference(mode):
    """Second-order gradients (e.g. gradient penalties) through every mode, blends included."""
    x, rm, rv, w, b = make_inputs((4, 3, 2, 2))
    g = torch.randn(4, 3, 2, 2, dtype=torch.float64)

    def second(fn):
        y = fn(x, rm, rv, w, b)
        gx, gw = torch.autograd.grad(y, (x, w), g, create_graph=True)
        return torch.autograd.grad((gx * gx).sum() + (gw * gw).sum(), (x, w, b), allow_unused=True)

    got = second(lambda *a: ours(*a, mode))
    want = second(lambda *a: reference_bn(*a, mode[0]))
    for a, e in zip(got, want):
        if e is None:
            assert a is None or torch.equal(a, torch.zeros_like(a))
        else:
            torch.testing.assert_close(a, e, **TOL[torch.float64])


def test_the_gradient_test_can_fail(monkeypatch):
    """Inject a sign error into the backward: the reference comparison must catch it."""
    from bnctl import autograd as ag

    original = ag._NormalizeWithStats.backward

    def wrong(ctx, grad_out):
        grads = list(original(ctx, grad_out))
        grads[3] = -grads[3]
        return tuple(grads)

    monkeypatch.setattr(ag._NormalizeWithStats, "backward", staticmethod(wrong))
    with pytest.raises(AssertionError):
        test_matches_reference_autograd_random_upstream((0.3, "none"), (4, 3, 5, 5), torch.float64)


def test_running_forward_equals_torch_eval_bitwise():
    x, rm, rv, w, b = make_inputs((4, 3, 5, 5), torch.float32)
    y = ours(x, rm, rv, w, b, ("running", "none"))
    assert torch.equal(y, torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5))


def test_writes_never_invalidate_a_graph_that_saved_the_buffers():
    """As PyTorch's kernel: eager writes bump no version, so an earlier graph's backward still runs."""
    x, rm, rv, w, b = make_inputs((4, 3, 2, 2))
    y, _ = normalize(x, RUNNING, rm, rv, w, b, 1e-5)  # saves the buffers, as torch's eval mode does
    copy_if_finite_([rm, rv], torch.cat([rm + 1, rv * 2]), None)
    y.backward(torch.randn_like(y))


def test_a_forward_that_updates_next_gives_autograd_copies():
    """SPEC 3: normalizing with the statistics and updating them in one forward: backward uses
    the values from before the update."""
    x, rm, rv, w, b = make_inputs((4, 3, 2, 2))
    for how, alpha in ((RUNNING, 1.0), (RENORM, 1.0), (BLEND, 0.4)):
        before = (rm.clone(), rv.clone())
        y, _ = normalize(x, how, rm, rv, w, b, 1e-5, alpha=alpha, limits=RENORM_LIMITS, observe=True)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w), g)
        rm.add_(1.0), rv.mul_(2.0)  # even an in-place update that bumps the version
        y2, _ = normalize(x, how, *before, w, b, 1e-5, alpha=alpha, limits=RENORM_LIMITS, observe=True)
        for a, e in zip(got, torch.autograd.grad(y2, (x, w), g)):
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("how", [BATCH, RUNNING])
def test_an_update_staged_in_the_kernel_is_torchs_arithmetic(how):
    """``into=``: the kernel that passes over x computes the EMA into the given copy, with the
    arithmetic of torch's training kernel; the running statistics passed in are only read."""
    x = torch.randn(8, 3, 4, 4)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    ref_rm, ref_rv = rm.clone(), rv.clone()
    want = torch.nn.functional.batch_norm(x, ref_rm, ref_rv, None, None, True, 0.3, 1e-5)
    staged = torch.stack([rm, rv])
    y, observed = normalize(x, how, rm, rv, None, None, 1e-5, into=staged.unbind(), momentum=0.3)
    assert observed is None and torch.equal(staged, torch.stack([ref_rm, ref_rv]))
    if how == BATCH:
        assert torch.equal(y, want)
    else:
        assert torch.equal(y, torch.nn.functional.batch_norm(x, rm, rv, None, None, False, 0.0, 1e-5))
    assert not torch.equal(rm, ref_rm)  # the inputs were only read


def test_batch_norm_needs_running_stats_for_running_modes():
    with pytest.raises(ValueError, match="expected running statistics"):
        batch_norm(torch.randn(4, 3), None, None, mode=Mode("running", "none"))


def test_batch_norm_updates_in_place_like_torch():
    x = torch.randn(8, 3)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, mode=Mode("batch", "ema"), momentum=0.1, num_batches_tracked=nbt)
    want = torch.nn.functional.batch_norm(x, ref_rm, ref_rv, None, None, True, 0.1, 1e-5)
    assert torch.equal(y, want) and torch.equal(rm, ref_rm) and torch.equal(rv, ref_rv) and int(nbt) == 1
    x[0, 0] = math.nan
    batch_norm(x, rm, rv, mode=Mode("batch", "ema"), num_batches_tracked=nbt)
    assert torch.equal(rm, ref_rm) and int(nbt) == 1


@pytest.mark.parametrize("mode, error, match", [
    ("batch", TypeError, r"^batch_norm: expected mode=bnctl.Mode\(normalize, update\).*got 'batch'"),
    (None, TypeError, r"^batch_norm: expected mode=bnctl.Mode"),
    (("batchh", "ema"), ValueError, r"^batch_norm: Mode.normalize: expected one of .*got 'batchh'"),
    (("batch", "emaa"), ValueError, r"^batch_norm: Mode.update: expected one of .*got 'emaa'"),
    ((1.5, "none"), ValueError, r"^batch_norm: Mode.normalize: a blend weight must lie in \[0, 1\]"),
])
def test_batch_norm_says_what_a_mode_is(mode, error, match):
    with pytest.raises(error, match=match):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), mode=mode)


def test_batch_norm_names_bad_shapes():
    with pytest.raises(ValueError, match=r"^batch_norm: expected an input of shape \(N, C, \*\), got shape \(4,\)"):
        batch_norm(torch.randn(4), torch.zeros(3), torch.ones(3), mode=Mode("batch", "ema"))
    rm = torch.zeros(3)
    with pytest.raises(ValueError, match=r"^batch_norm: expected running_mean of 5 values .* got 3"):
        batch_norm(torch.randn(4, 5), rm, torch.ones(3), mode=Mode("batch", "ema"))
    with pytest.raises(ValueError, match=r"^batch_norm: expected weight of 3 values"):
        batch_norm(torch.randn(4, 3), rm, torch.ones(3), torch.ones(2), mode=Mode("running", "none"))


def test_batch_norm_counts_an_empty_batch_as_torch_does():
    """nn.BatchNorm counts every train() forward in num_batches_tracked, an empty one too (with
    momentum=None the next average depends on it); the statistics stay."""
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(4)
    y = batch_norm(torch.randn(0, 3), rm, rv, mode=Mode("batch", "ema"), momentum=None, num_batches_tracked=nbt)
    assert y.shape == (0, 3) and int(nbt) == 5 and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    batch_norm(torch.randn(0, 3), rm, rv, mode=Mode("batch", "none"), num_batches_tracked=nbt)
    assert int(nbt) == 5  # nothing was due


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("buffers", ["float32", "same"])
def test_blend_statistics_of_half_inputs_are_reduced_in_float32(dtype, buffers):
    """As PyTorch's kernels: a blend's running statistics are as close to the float64 reduction of the
    same values as PyTorch's own (float32 buffers: float32 rounding; half buffers: one rounding)."""
    from torch import nn

    import bnctl

    torch.manual_seed(0)
    x = (torch.randn(64, 8, 8, 8) * 0.5 + 30).to(dtype)
    buffer_dtype = dtype if buffers == "same" else torch.float32
    ours = nn.BatchNorm2d(8).to(buffer_dtype)
    bnctl.apply(ours, bnctl.Policy(0.5, "ema", "running", "none", momentum=1.0))
    native = nn.BatchNorm2d(8, momentum=1.0).to(buffer_dtype)
    ours.train()(x)
    native.train()(x.to(buffer_dtype))
    for key, want in (("running_mean", x.double().mean((0, 2, 3))), ("running_var", x.double().var((0, 2, 3)))):
        error = ((getattr(ours, key).double() - want).abs() / want.abs()).max()
        torch_error = ((getattr(native, key).double() - want).abs() / want.abs()).max()
        assert error <= 2 * torch_error + 2e-7, key
