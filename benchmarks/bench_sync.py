"""Synchronized BatchNorm on 2 gloo ranks (CPU, loopback): forward+backward time against the local
policy in the same run, and the number of collectives per layer per step.

Each rank runs its half of the batch; times are the median over steps of the slowest rank (a barrier
before each step), so they include waiting for the other rank. A local-against-itself row shows the
noise. The collective count is measured by counting ``torch.distributed.all_reduce`` calls. Not a
test: nothing is asserted.

    python benchmarks/bench_sync.py [--repeat 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnctl

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (64, 512, 7, 7), (16, 32, 8, 8)]
PRESETS = ["torch", "running_update", "renorm", "frozen"]


def _calls() -> list:
    calls: list = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    return calls


def _time(layer, x, g, repeat: int) -> float:
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)

    for _ in range(3):
        step()
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        slowest = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times.append(float(slowest))
    return statistics.median(times)


def _layer(c: int, preset: str, sync: bool) -> torch.nn.Module:
    layer = bnctl.BatchNorm2d(c)
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2)
        layer.num_batches_tracked.fill_(100)
    policy = dataclasses.replace(bnctl.PRESETS[preset], sync=sync, renorm_warmup=(0, 0))
    bnctl.apply(layer, policy)
    return layer.train()


def _worker(rank: int, world: int, store: str, repeat: int, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls = _calls()
    if rank == 0:
        print(f"torch {torch.__version__}, {world} gloo ranks on the CPU, {threads} thread(s) each; "
              "forward+backward, half the batch per rank")
        print(f"{'shape (whole batch)':22s} {'policy':15s} {'local ms':>9s} {'synced':>8s} "
              f"{'local again':>11s} {'collectives/step':>16s}")
    for shape in SHAPES:
        n, c, h, w = shape
        torch.manual_seed(rank)
        x = torch.randn(n // world, c, h, w, requires_grad=True)
        g = torch.randn_like(x)
        for preset in PRESETS:
            local = _time(_layer(c, preset, False), x, g, repeat)
            synced_layer = _layer(c, preset, True)
            synced = _time(synced_layer, x, g, repeat)
            again = _time(_layer(c, preset, False), x, g, repeat)
            calls.clear()
            x.grad = None
            synced_layer(x).backward(g)
            if rank == 0:
                print(f"{str(shape):22s} {preset:15s} {local * 1e3:9.2f} {synced / local:7.2f}x "
                      f"{again / local:10.2f}x {len(calls):16d}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "store"), args.repeat, args.threads), nprocs=2)


if __name__ == "__main__":
    main()
