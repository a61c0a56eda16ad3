"""Synchronized batch statistics over gloo process groups on the CPU (2-4 ranks, float64, loopback).

Each test spawns its ranks once; every rank runs all its cases and saves what it computed, and the
parent compares with one process running the same policy, unsynchronized, on the concatenated batch.
Process groups time out after ``TIMEOUT`` and the parent kills ranks still running after ``DEADLINE``:
a hang fails its test, it never stalls the run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import os
import re
import tempfile
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnctl

C = 3
SYNCED = ["torch", "running_update", "renorm", "batch_no_update", "test_time", "recalibrate", "blend"]
SLICES = {2: [3, 5], 3: [5, 0, 3], 4: [2, 1, 0, 5]}  # uneven, with an empty rank
EXACT = dict(rtol=1e-12, atol=1e-12)
TIMEOUT = datetime.timedelta(seconds=20)  # of every process group (gloo's default is 30 minutes)
DEADLINE = 45.0  # seconds for all ranks of one spawn to finish


def policy(name: str, sync: bool) -> bnctl.Policy:
    base = bnctl.Policy(0.5, "ema", "running", "none", name=None) if name == "blend" else bnctl.PRESETS[name]
    if name == "renorm":
        base = dataclasses.replace(base, renorm_warmup=(0, 0), rmax=1.2, dmax=0.1)
    return dataclasses.replace(base, sync=sync)


def make_layer(name: str, sync: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = bnctl.BatchNorm2d(C, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(C))
        layer.running_var.copy_(torch.rand(C) + 0.5)
        layer.weight.copy_(torch.rand(C) + 0.5)
        layer.bias.copy_(torch.randn(C))
    bnctl.apply(layer, policy(name, sync))
    return layer


def batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two steps of (input, upstream gradient) for the whole batch."""
    g = torch.Generator().manual_seed(1)
    n = sum(SLICES[world])
    return [(3 * torch.randn(n, C, 2, 2, generator=g, dtype=torch.float64) + 2,
             torch.randn(n, C, 2, 2, generator=g, dtype=torch.float64)) for _ in range(2)]


def run_layer(layer: nn.Module, steps: list[tuple[torch.Tensor, torch.Tensor]], training: bool,
              calls: list | None = None) -> dict:
    """Forward, backward with the given upstream gradient, per step; outputs, input and affine gradients
    (summed over steps), and the buffers after; with ``calls`` (see :func:`_count_collectives`), the
    number of collectives of each step."""
    out: dict = {"y": [], "dx": [], "collectives": []}
    layer.train(training)
    for x, g in steps:
        x = x.clone().requires_grad_(True)
        before = 0 if calls is None else len(calls)
        y = layer(x)
        y.backward(g)
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["collectives"].append(0 if calls is None else len(calls) - before)
    out["dw"], out["db"] = layer.weight.grad, layer.bias.grad
    out["buffers"] = {k: v.clone() for k, v in layer.named_buffers()}
    return out


def _worker(rank: int, world: int, store: str, task: Callable, results: str) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        torch.save(task(rank, world), os.path.join(results, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(task: Callable, world: int) -> list:
    """Run ``task(rank, world)`` on ``world`` gloo ranks; each rank's return value, in rank order. A rank that
    raises or dies fails the test; ranks still running after ``DEADLINE`` seconds are killed and fail it."""
    with tempfile.TemporaryDirectory() as tmp:
        ranks = mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), task, tmp), nprocs=world,
                                   join=False, start_method="spawn")
        end = time.monotonic() + DEADLINE
        try:
            while not ranks.join(timeout=max(end - time.monotonic(), 0.0)):
                if time.monotonic() >= end:
                    pytest.fail(f"{task.__name__}: ranks still running after {DEADLINE:g} s (a hang); killed")
        finally:
            for process in ranks.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world)]


def _slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    start = sum(SLICES[world][:rank])
    return t[start:start + SLICES[world][rank]]


def layer_cases(rank: int, world: int) -> dict:
    calls = _count_collectives()
    found = {}
    for name in SYNCED:
        for training in (True, False):
            steps = [(_slice(x, rank, world), _slice(g, rank, world)) for x, g in batches(world)]
            found[name, training] = run_layer(make_layer(name, True), steps, training, calls)
    return found


def _count_collectives() -> list:
    calls: list = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    return calls


@pytest.mark.parametrize("world", [2, 3, 4])
def test_k_ranks_compute_what_one_process_computes_on_the_whole_batch(world):
    ranks = spawn(layer_cases, world)
    for name in SYNCED:
        for training in (True, False):
            ref = run_layer(make_layer(name, False), batches(world), training)
            got = [r[name, training] for r in ranks]
            for step in range(2):
                torch.testing.assert_close(torch.cat([g["y"][step] for g in got]), ref["y"][step], **EXACT)
                torch.testing.assert_close(torch.cat([g["dx"][step] for g in got]), ref["dx"][step], **EXACT)
            for key in ("dw", "db"):  # summed over ranks (None where the policy freezes the affine part)
                summed = None if ref[key] is None else sum(g[key] for g in got)
                torch.testing.assert_close(summed, ref[key], **EXACT)
            for g in got:  # identical buffers on every rank, equal to the single process's
                for key, value in ref["buffers"].items():
                    torch.testing.assert_close(g["buffers"][key], value, **EXACT)
            uses_batch = policy(name, True).mode(training).normalize != "running"
            updates = policy(name, True).mode(training).update != "none"
            per_step = 2 * uses_batch + (updates and not uses_batch)  # forward (+ backward)
            # the first forward checks that every rank runs the layer alike (one small collective); none after
            first = per_step + (per_step > 0)
            assert all(g["collectives"] == [first, per_step] for g in got), (name, training, got[0]["collectives"])


def nan_case(rank: int, world: int) -> dict:
    out = {}
    for name in ("torch", "running_update", "recalibrate"):
        layer = make_layer(name, True)
        before = {k: v.clone() for k, v in layer.named_buffers()}
        x = _slice(batches(world)[0][0], rank, world).clone()
        if rank == 1:
            x[0, 0, 0, 0] = float("nan")
        with torch.no_grad():
            layer.train()(x)
        out[name] = all(torch.equal(before[k], v) for k, v in layer.named_buffers())
    return out


def test_a_non_finite_statistic_on_one_rank_skips_the_update_on_every_rank():
    assert spawn(nan_case, 2) == [{"torch": True, "running_update": True, "recalibrate": True}] * 2


def sync_batchnorm_case(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    layer = nn.SyncBatchNorm(C).double()
    bnctl.apply(layer, "running_update")  # an nn.SyncBatchNorm synchronizes under any policy
    x = _slice(batches(world)[0][0], rank, world)
    with torch.no_grad():
        layer.train()(x)
    group = dist.new_group([0, 1])
    other = make_layer("torch", True)
    bnctl.apply(other, policy("torch", True), process_group=group)
    return {"running_mean": layer.running_mean,
            "report": [r.sync for r in bnctl.report(nn.Sequential(layer, other, nn.BatchNorm2d(C))).layers]}


def test_sync_batchnorm_synchronizes_under_its_policy_on_the_cpu():
    x = batches(2)[0][0]
    ref = nn.BatchNorm2d(C).double()
    torch.manual_seed(0)
    bnctl.apply(ref, "running_update")
    with torch.no_grad():
        ref.train()(x)
    for got in spawn(sync_batchnorm_case, 2):
        torch.testing.assert_close(got["running_mean"], ref.running_mean, **EXACT)
        assert got["report"] == ["world (2 ranks)", "group (2 ranks)", "-"]


def recalibrate_case(rank: int, world: int) -> dict:
    model = _model()
    data = _data()
    mine = [b for i, b in enumerate(data) if i % (world + 1) == rank]  # last shares nothing with rank world
    if rank == world - 1:
        mine = []  # a rank with no batches at all
    done = bnctl.recalibrate(model, mine if rank < world - 1 else [], sync=True)
    return {"done": done, "buffers": {k: v.clone() for k, v in model.named_buffers()}}


def _model(sync_batchnorm: bool = True) -> nn.Module:
    """Conv-BN-ReLU-Conv-BN, the last an nn.SyncBatchNorm (which synchronizes under any policy, except while
    recalibrate gathers each rank's own statistics). DDP refuses SyncBatchNorm on CPU modules."""
    torch.manual_seed(0)
    last = nn.SyncBatchNorm(C) if sync_batchnorm else nn.BatchNorm2d(C)
    return nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1), last).double()


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [3 * torch.randn(4 + i, C, 3, 3, generator=g, dtype=torch.float64) + 1 for i in range(6)]


def test_recalibrate_with_sync_merges_every_ranks_data_once():
    world = 3
    ranks = spawn(recalibrate_case, world)
    used = [b for i, b in enumerate(_data()) if i % (world + 1) < world - 1]
    ref = _model()
    # the first layer's statistics do not depend on how the data was split: compare with one process
    bnctl.recalibrate(ref, used, layers="1")
    for got in ranks:
        assert got["done"] == ["1", "4"]
        for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            torch.testing.assert_close(got["buffers"][key], dict(ref.named_buffers())[key], **EXACT)
        for key, value in ranks[0]["buffers"].items():  # every rank writes the same
            assert torch.equal(got["buffers"][key], value)


def ddp_case(rank: int, world: int) -> dict:
    model = _trained_model(sync=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    _train(ddp, model, lambda x: x.chunk(world)[rank])
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _trained_model(sync: bool) -> nn.Module:
    model = _model(sync_batchnorm=False)
    bnctl.apply(model, dataclasses.replace(bnctl.PRESETS["torch"], sync=sync))
    return model


def _train(wrapped: nn.Module, model: nn.Module, part: Callable) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = 2 * torch.randn(8, C, 3, 3, generator=g, dtype=torch.float64) + 1
        opt.zero_grad()
        wrapped.train()(part(x)).square().mean().backward()  # the mean over an equal slice: DDP averages
        opt.step()


def test_ddp_with_synced_policies_trains_like_one_process_on_the_whole_batches():
    ranks = spawn(ddp_case, 2)
    ref = _trained_model(sync=False)
    _train(ref, ref, lambda x: x)
    want = {k: v.detach() for k, v in [*ref.named_parameters(), *ref.named_buffers()]}
    for got in ranks:
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12)


def test_sync_without_a_process_group_is_the_local_policy_bit_for_bit():
    steps = batches(2)
    for name in SYNCED:
        for training in (True, False):
            got = run_layer(make_layer(name, True), steps, training)
            ref = run_layer(make_layer(name, False), steps, training)
            for key in ("y", "dx"):
                assert all(torch.equal(a, b) for a, b in zip(got[key], ref[key]))
            assert all(torch.equal(v, ref["buffers"][k]) for k, v in got["buffers"].items())


def test_report_says_a_synced_layer_has_no_process_group_to_sync_over():
    rows = bnctl.report(nn.Sequential(make_layer("torch", True), nn.BatchNorm2d(C))).layers
    assert [r.sync for r in rows] == ["no process group", "-"]


def test_policy_sync_must_be_a_bool():
    with pytest.raises(ValueError, match="Policy.sync"):
        bnctl.Policy(sync=1)
    assert copy.copy(bnctl.PRESETS["torch"]).sync is False


@contextlib.contextmanager
def one_rank():
    """A gloo process group of this process alone."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_sync_normalize_gradcheck_on_one_rank(alpha):
    from bnctl.distributed import sync_normalize
    from bnctl.stats import global_stats

    with one_rank():
        x = (2 * torch.randn(5, C, 3, 2, dtype=torch.float64) + 1).requires_grad_(True)
        w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
        b = torch.randn(C, dtype=torch.float64, requires_grad=True)
        rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

        def f(x, w, b):
            stats = global_stats(x, None)
            return sync_normalize(x, w, b, 1e-5, None, stats, alpha=alpha, running_mean=rm, running_var=rv)[0]

        assert torch.autograd.gradcheck(f, (x, w, b))


def test_mixed_precision_input_with_float32_parameters():
    x = torch.randn(8, C, 4, 4).bfloat16()
    local, synced = nn.BatchNorm2d(C), nn.BatchNorm2d(C)
    bnctl.apply(local, "torch")
    with one_rank():
        bnctl.apply(synced, policy("torch", True))
        y = synced.train()(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, local.train()(x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(synced.running_var, local.running_var, rtol=1e-3, atol=1e-3)


def test_fallback_holds_under_sync():
    x = torch.randn(1, C, 1, 1, dtype=torch.float64)
    fallback = dataclasses.replace(bnctl.PRESETS["torch"], fallback=True)
    local = make_layer("torch", False)
    bnctl.apply(local, fallback)
    synced = make_layer("torch", False)
    with one_rank():
        bnctl.apply(synced, dataclasses.replace(fallback, sync=True))
        assert torch.equal(synced.train()(x), local.train()(x))
        assert int(synced.num_batches_tracked) == 0
        bnctl.apply(synced, policy("torch", True))  # no fallback: every rank raises alike
        with pytest.raises(ValueError, match="BatchNorm2d: expected more than 1 value per channel.*"
                           "got 1 value per channel over all ranks"):
            synced(x)


def test_process_groups_are_checked_and_not_copied():
    layer = make_layer("torch", False)
    with pytest.raises(ValueError, match="init_process_group"):
        bnctl.apply(layer, policy("torch", True), process_group=object())
    with one_rank():
        with pytest.raises(TypeError, match="ProcessGroup"):
            bnctl.apply(layer, policy("torch", True), process_group=object())
        bnctl.apply(layer, policy("torch", True), process_group=dist.group.WORLD)
        copied = copy.deepcopy(nn.Sequential(layer))
        assert copied[0].policy.sync and layer_group(copied[0]) is dist.group.WORLD


def layer_group(layer: nn.Module):
    return layer._bnctl.sync_group(layer)


# -- ranks that disagree: an error on every rank naming the layer, never a hang, wrong numbers or an abort -----


class Branches(nn.Module):
    """Two synchronized layers of the same width; which one runs depends on the data (here: the rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_a, self.branch_b = nn.BatchNorm2d(C).double(), nn.BatchNorm2d(C).double()

    def forward(self, x: torch.Tensor, take_a: bool) -> torch.Tensor:
        return self.branch_a(x) if take_a else self.branch_b(x)


def _error(run: Callable) -> str | None:
    try:
        run()
    except RuntimeError as err:
        return str(err)
    return None


def disagree_cases(rank: int, world: int) -> dict:
    x = _slice(batches(world)[0][0], rank, world)
    synced = policy("torch", True)
    out = {}

    model = Branches()
    bnctl.apply(model, synced)
    out["branch, first forward"] = _error(lambda: model.train()(x, take_a=rank == 0))

    model = Branches()
    bnctl.apply(model, synced)
    model.train()(x, take_a=True)  # both branches checked on every rank
    model(x, take_a=False)
    out["branch, later forward"] = _error(lambda: model(x, take_a=rank == 0))

    layer = make_layer("torch", False)
    bnctl.apply(layer, policy("torch" if rank == 0 else "test_time", True))
    out["policy"] = _error(lambda: layer.train()(x))

    layer = make_layer("torch", False)
    bnctl.apply(layer, bnctl.Policy("batch", "ema", "batch", "none", name=None, sync=True))
    out["mode"] = _error(lambda: layer.train(rank == 0)(x))

    layer = make_layer("torch", True)
    layer.train()(x)
    if rank == 1:
        bnctl.apply(layer, policy("test_time", True))  # on one rank only, after the first check
    out["policy changed on one rank"] = _error(lambda: layer(x))

    torch.manual_seed(0)
    wide = nn.Sequential(nn.BatchNorm2d(C + rank)).double()
    bnctl.apply(wide, synced)
    out["channels"] = _error(lambda: wide.train()(torch.randn(2, C + rank, 2, 2, dtype=torch.float64)))

    out["then alike"] = _error(lambda: make_layer("torch", True).train()(x))  # the group is still usable
    return out


def test_ranks_that_disagree_on_a_synced_layer_raise_on_every_rank_naming_it():
    ranks = spawn(disagree_cases, 2)
    want = {
        "branch, first forward": [r"^{me}: ranks disagree on the synchronized BatchNorm forward \(different layer\): "
                                  r"rank 0 runs branch_a with 3 channels in mode \(batch, ema, momentum 0\.1\); "
                                  r"rank 1 runs branch_b with 3 channels"],
        "branch, later forward": [r"^{me}: ranks disagree .*\(different layer\): rank 0 runs branch_a.*; rank 1 runs "
                                  r"branch_b"],
        "policy": [r"^BatchNorm2d: .*\(different mode\): rank 0 runs BatchNorm2d with 3 channels in mode \(batch, "
                   r"ema, momentum 0\.3\); rank 1 runs BatchNorm2d with 3 channels in mode \(batch, none"],
        "mode": [r"^BatchNorm2d: .*\(different mode\).*\(batch, ema, .*\(batch, none"],
        "policy changed on one rank": [r"^BatchNorm2d: .*\(different mode\).*\(batch, ema, .*\(batch, none"],
        "channels": [r"^0: .*\(different channels\): rank 0 runs 0 with 3 channels .*; rank 1 runs 0 with 4 channels"],
    }
    for case, (pattern,) in want.items():
        for rank, got in enumerate(ranks):
            me = "branch_a" if rank == 0 else "branch_b"
            assert got[case] is not None and re.search(pattern.format(me=me), got[case]), (case, got[case])
            assert "Fix: run the same synchronized layers" in got[case]
    assert [r["then alike"] for r in ranks] == [None, None]


def timeout_cases(rank: int, world: int) -> dict:
    """Rank 1 leaves rank 0 alone in a collective (eval() where rank 0 trains; a forward without backward)."""
    x = _slice(batches(world)[0][0], rank, world)
    out = {}
    for case in ("forward", "backward"):
        group = dist.new_group(timeout=datetime.timedelta(seconds=1))
        layer = make_layer("torch", False)
        bnctl.apply(layer, policy("torch", True), process_group=group)
        if rank == 0:
            out[case] = _error(lambda layer=layer: layer.train()(x.clone().requires_grad_(True)).sum().backward())
        elif case == "forward":
            layer.eval()(x)  # running statistics: no collective
        else:
            with torch.no_grad():
                layer.train()(x)  # the forward's collectives, and no backward
        time.sleep(1.5)  # past rank 0's timeout (leaving would close the connection instead)
    return out


def test_a_collective_that_times_out_is_re_raised_naming_the_layer():
    got = spawn(timeout_cases, 2)[0]
    for case in ("forward", "backward"):
        assert re.search(rf"^BatchNorm2d: expected every rank of the process group to join this layer's synchronized "
                         rf"BatchNorm {case}, got an error from the collective: .*Timed out", got[case]), got[case]


def outside_group_case(rank: int, world: int) -> str | None:
    group = dist.new_group([0])  # on rank 1: GroupMember.NON_GROUP_MEMBER
    try:
        bnctl.apply(make_layer("torch", False), policy("torch", True), process_group=group)
    except ValueError as err:
        return str(err)
    return None


def test_apply_with_a_group_this_rank_is_not_in_says_so():
    got = spawn(outside_group_case, 2)
    assert got[0] is None
    assert got[1] is not None and got[1].startswith(
        "process_group: expected a group this rank (1) belongs to, got GroupMember.NON_GROUP_MEMBER (what "
        "torch.distributed.new_group(ranks) returns on the ranks not in ranks). Fix:"), got[1]
