"""Synchronized statistics over NCCL (one GPU, world size 1): the code path a multi-GPU job runs.

Checks, for the presets that synchronize, that a ``sync=True`` policy over a one-rank NCCL group gives
the same outputs, gradients and buffers as the local policy (float64 on the GPU), and counts the
collectives per training step. Not part of CI (needs CUDA and NCCL).

    python benchmarks/check_nccl.py [--backend gloo --device cpu]   (the second form: a dry run on the CPU)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

import bnctl
from bnctl.policy import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device_id = torch.device("cuda", 0) if device.type == "cuda" else None  # (NCCL asks for an index)
    dist.init_process_group(args.backend, rank=0, world_size=1, device_id=device_id)
    print(f"torch {torch.__version__}, backend {dist.get_backend()}, device {device}")
    calls = {"n": 0}
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counted
    worst = 0.0
    try:
        for name in ("torch", "running_update", "renorm", "test_time", "batch_no_update"):
            torch.manual_seed(0)
            local = nn.BatchNorm2d(8).to(device, torch.float64)
            synced = copy.deepcopy(local)
            bnctl.apply(local, name)
            bnctl.apply(synced, dataclasses.replace(PRESETS[name], sync=True))
            for step in range(3):
                x = torch.randn(6, 8, 5, 5, device=device, dtype=torch.float64) * 2 + step
                g = torch.randn_like(x)
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                calls["n"] = 0
                ya, yb = local(xa), synced(xb)
                ya.backward(g), yb.backward(g)
                diffs = [(ya - yb).detach().abs().max(), (xa.grad - xb.grad).abs().max()]
                diffs += [(a - b).abs().max() for a, b in zip(local.state_dict().values(), synced.state_dict().values())
                          if a.is_floating_point()]
                worst = max(worst, max(float(d) for d in diffs))
                print(f"{name:16s} step {step}: max |local - synced| {max(float(d) for d in diffs):.2e}, "
                      f"all_reduce calls {calls['n']}")
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()
    print(f"worst difference {worst:.2e} ({'OK' if worst < 1e-12 else 'MISMATCH'})")


if __name__ == "__main__":
    main()
