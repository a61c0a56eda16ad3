"""The fused Triton update (bnctl.kernels) against the composed PyTorch ops it replaces.

Runs on CUDA where there is one, and on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, as ``make test-integrations`` runs it); skipped where
Triton is not installed (CI's CPU wheel of PyTorch has none).
"""

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import bnctl
from bnctl import kernels
from bnctl.guard import copy_if_finite_, write_running_, write_staged_
from bnctl.stats import Accumulator, BatchStats, new_running_values

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    kernels.triton is None or (DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton, on a CUDA device or under TRITON_INTERPRET=1",
)



@pytest.fixture(autouse=True)
def kernel_on_this_device(monkeypatch):
    monkeypatch.setattr(kernels, "_ON_CPU", DEV == "cpu")
    yield
    assert kernels.FAILED is None  # the kernel compiled and ran (a failure falls back to the ops, warning)


@pytest.fixture(autouse=True)
def quiet_skips():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "BatchNorm.d: skipped a running-statistics update", RuntimeWarning)
        yield


# (running dtype, tolerance against the composed ops): the kernel rounds as they do, but the
# compilers may contract a multiply-add differently (one rounding step: a last-bit difference).
# Triton's CPU interpreter converts to bfloat16 by truncation (numpy has no bfloat16), the GPU
# rounds to nearest: up to three bfloat16 steps apart there.
DTYPES = {torch.float32: dict(rtol=3e-7, atol=1e-7), torch.float16: dict(rtol=1e-3, atol=1e-3),
          torch.bfloat16: dict(rtol=8e-3, atol=8e-3) if DEV == "cuda" else dict(rtol=3e-2, atol=3e-2)}


def buffers(channels, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rm = torch.randn(channels, generator=g).to(DEV, dtype)
    rv = (torch.rand(channels, generator=g) + 0.5).to(DEV, dtype)
    stats = BatchStats(torch.randn(channels, generator=g).to(DEV) * 3, torch.rand(channels, generator=g).to(DEV) * 2,
                       37)
    return rm, rv, torch.tensor(5, device=DEV), stats


def composed(rm, rv, nbt, observed, momentum, counter=None):
    targets, values = new_running_values(False, rm, rv, nbt, observed, momentum)
    return copy_if_finite_(targets, values, nbt, counter=counter)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [1, 3, 1024, 1500, 4097])
@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.9, 0.0, 1.0])
def test_ema_of_batch_statistics_matches_composed(dtype, channels, momentum):
    rm, rv, nbt, stats = buffers(channels, dtype)
    want = [t.clone() for t in (rm, rv, nbt)]
    counter, want_counter = torch.tensor(2, device=DEV), torch.tensor(2, device=DEV)
    assert bool(composed(*want, stats, momentum, want_counter))
    ok = write_running_(rm, rv, nbt, stats, momentum, counter=counter)
    assert isinstance(ok, torch.Tensor) and bool(ok)
    torch.testing.assert_close(rm, want[0], **DTYPES[dtype])
    torch.testing.assert_close(rv, want[1], **DTYPES[dtype])
    assert int(nbt) == int(want[2]) == 6 and int(counter) == int(want_counter) == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [1, 1025])
def test_values_from_the_kernel_are_copied_exactly(dtype, channels):
    rm, rv, nbt, _ = buffers(channels, dtype)
    new = torch.stack([rm * 2 + 1, rv * 3])
    ok = kernels.ema_if_finite_(rm, rv, new[0], new[1], None, counters=(nbt,))
    assert bool(ok) and torch.equal(rm, new[0]) and torch.equal(rv, new[1]) and int(nbt) == 6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 1029])  # first block, and a later block than the first
@pytest.mark.parametrize("ema", [True, False])
def test_nothing_written_when_any_value_is_not_finite(bad, where, ema):
    rm, rv, nbt, stats = buffers(1100, torch.float32)
    before = [t.clone() for t in (rm, rv, nbt)]
    counter = torch.tensor(0, device=DEV)
    if ema:
        stats.var[where] = bad
        ok = write_running_(rm, rv, nbt, stats, 0.1, counter=counter)
    else:
        new = torch.stack([rm + 1, rv + 1])
        new[1, where] = bad
        ok = kernels.ema_if_finite_(rm, rv, new[0], new[1], None, counters=(nbt, counter))
    assert not bool(ok) and int(counter) == 0
    for a, b in zip((rm, rv, nbt), before):
        assert torch.equal(a, b)


def test_one_value_per_channel_writes_nothing():
    rm, rv, nbt, stats = buffers(4, torch.float32)
    before = rv.clone()
    ok = write_running_(rm, rv, nbt, stats._replace(n=1), 0.1)
    assert not bool(ok) and torch.equal(rv, before) and int(nbt) == 5


def test_cumulative_average_momentum_none():
    rm, rv, nbt, stats = buffers(8, torch.float32)
    want = [t.clone() for t in (rm, rv, nbt)]
    composed(*want, stats, None)
    write_running_(rm, rv, nbt, stats, None)
    torch.testing.assert_close(rm, want[0], **DTYPES[torch.float32])
    torch.testing.assert_close(rv, want[1], **DTYPES[torch.float32])
    assert int(nbt) == 6


def test_where_the_kernel_does_not_apply_the_composed_ops_run(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "ema_if_finite_", lambda *a, **k: calls.append(1))
    rm, rv, nbt, stats = buffers(4, torch.float64)  # float64 buffers: composed (Triton's scalars are float32)
    assert bool(write_running_(rm, rv, nbt, stats, 0.1))
    rm, rv, nbt, stats = buffers(8, torch.float32)
    rm_strided = torch.zeros(16, device=DEV)[::2]  # not contiguous
    assert not kernels.usable(rm_strided) and kernels.usable(rm, rv, None)
    assert bool(write_running_(rm_strided, rv, nbt, stats, 0.1))
    assert bool(write_running_(rm, rv, nbt, stats, None, Accumulator.empty(8, rm.device)))
    assert calls == []
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert not kernels.usable(rm)


@pytest.mark.skipif(DEV == "cpu", reason="eagerly on the CPU a layer's kernel updates the buffers in place")
@pytest.mark.parametrize("preset", ["torch", "running_update"])
def test_layers_with_the_kernel_match_the_composed_ops(preset, monkeypatch):
    torch.manual_seed(0)
    fused = nn.BatchNorm2d(6).to(DEV)
    plain = copy.deepcopy(fused)
    bnctl.apply(fused, preset), bnctl.apply(plain, preset)
    calls, kernel = [], kernels.ema_if_finite_
    monkeypatch.setattr(kernels, "ema_if_finite_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    for step in range(4):
        x = torch.randn(8, 6, 5, 5, device=DEV) * 2 + step
        if step == 2:
            x[0, 4, 0, 0] = float("nan")  # skipped by both, counted by both
        fused(x)
        with monkeypatch.context() as m:
            m.setattr(kernels, "ENABLED", False)
            plain(x)
    tol = {} if preset == "running_update" else dict(rtol=0, atol=0)  # the torch preset copies the kernel's values
    for a, b in zip(fused.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, **tol)
    assert fused.skipped_updates == plain.skipped_updates == 1 and int(fused.num_batches_tracked) == 3
    assert len(calls) == 4  # every update of the fused layer ran the kernel, none of the plain one


def test_a_kernel_that_cannot_run_falls_back_to_the_ops_once(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such GPU")

    monkeypatch.setattr(kernels._ema_if_finite, "run", broken)
    monkeypatch.setattr(kernels, "FAILED", None)  # (restored to None afterwards)
    rm, rv, nbt, stats = buffers(4, torch.float32)
    want = [t.clone() for t in (rm, rv, nbt)]
    composed(*want, stats, 0.1)
    with pytest.warns(RuntimeWarning, match="failed to run .*no such GPU"):
        ok = write_running_(rm, rv, nbt, stats, 0.1)
    assert bool(ok) and torch.equal(rm, want[0]) and torch.equal(rv, want[1]) and int(nbt) == 6
    assert kernels.FAILED is not None and not kernels.usable(rm)
    kernels.FAILED = None  # (before the fixture checks that no other test made it fail)


def test_arguments_the_kernel_does_not_take_go_to_the_composed_ops(monkeypatch):
    rm, rv, nbt, stats = buffers(4, torch.float32)
    table = torch.arange(8.0, device=DEV).reshape(4, 2)  # .t() is a (2, 4) view that is not contiguous
    want = [t.clone() for t in (rm, rv, nbt)]
    copy_if_finite_(want[:2], table.t().reshape(-1), want[2])
    write_staged_(rm, rv, nbt, table.t())  # values staged by a kernel, in a layout the kernel does not take
    assert torch.equal(rm, want[0]) and torch.equal(rv, want[1]) and int(nbt) == 6
    before = [t.clone() for t in (rm, rv, nbt)]
    short = BatchStats(torch.ones(2, device=DEV), torch.ones(2, device=DEV), 10)
    with pytest.raises(RuntimeError):  # as the composed ops raise: nothing read or written out of bounds
        write_running_(rm, rv, nbt, short, 0.1)
    storage = torch.arange(10.0, device=DEV) + 100
    with pytest.raises(RuntimeError):
        write_running_(rm, storage[:1], nbt, stats, 0.1)
    assert torch.equal(storage, torch.arange(10.0, device=DEV) + 100)
    for a, b in zip((rm, rv, nbt), before):
        assert torch.equal(a, b)
    half_var = rv.half()
    assert not kernels.applies(rm, half_var, stats.mean, stats.var)  # buffers of two dtypes
    assert not kernels.applies(rm, rv, stats.mean, stats.var, (torch.tensor(1.0, device=DEV),))
    monkeypatch.setattr(kernels, "MAX_CHANNELS", 3)
    assert not kernels.applies(rm, rv, stats.mean, stats.var)


def test_fake_tensors_never_reach_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = torch.zeros(4, device=DEV)
    assert not kernels.usable(t)


def test_half_inputs_update_as_the_composed_ops(monkeypatch):
    """A blend of float16 inputs (autocast) reduces its statistics in float32: a variance beyond float16's
    range (here 80000) still reaches float32 buffers, by the kernel as by the composed ops."""
    policy = bnctl.Policy(0.5, "ema", "running", "none")
    fused = nn.BatchNorm1d(4).to(DEV)
    plain = copy.deepcopy(fused)
    bnctl.apply(fused, policy), bnctl.apply(plain, policy)
    for x in (torch.tensor([[0.0, 0, 0, 0], [400.0, 1, 1, 1]]), torch.randn(6, 4) * 3):
        x = x.to(DEV).half()
        fused(x)
        with monkeypatch.context() as m:
            m.setattr(kernels, "ENABLED", False)
            plain(x)
        for a, b in zip(fused.state_dict().values(), plain.state_dict().values()):
            torch.testing.assert_close(a, b)
    assert fused.skipped_updates == plain.skipped_updates == 0 and int(fused.num_batches_tracked) == 2
