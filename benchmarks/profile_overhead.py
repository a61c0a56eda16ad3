"""Where does a bnctl forward spend its time beyond native BatchNorm? (diagnostic, not a test)

1. Times forward-only and forward+backward of native BatchNorm2d and the bnctl ``torch``
   preset on one device. On CUDA the guarded update is one Triton kernel where Triton is
   installed; ``BNCTL_TRITON=0`` measures the composed PyTorch ops instead.
2. The fixed cost per forward of each preset: a tiny layer (4 x 8 x 2 x 2, where the
   arithmetic is negligible) against native BatchNorm in the matching mode, best of five
   rounds, in microseconds: what every BatchNorm layer of a model pays per forward
   whatever its size (Python, dispatch, the guard's few ops). ``bench_host.py`` breaks the
   CPU figure down (Python calls and ATen ops per forward).

    python benchmarks/profile_overhead.py [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import bnctl
from bnctl import kernels


def timed(fn, device, n=200, rounds=1):
    """Microseconds per call: the best of ``rounds`` rounds of ``n`` calls, after a warm-up."""
    for _ in range(max(20, n // 10)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


# preset -> the native mode it is compared with (True: train)
PRESETS = {"torch": True, "frozen": False, "frozen_stats": False, "running_update": True, "renorm": True}


def fixed_costs(device):
    print("\nfixed cost per forward: input (4, 8, 2, 2), forward only, microseconds (best of 5)")
    print(f"{'preset':<16} {'x grad':<7} {'native':>8} {'bnctl':>8} {'extra':>8}")
    for preset, train in PRESETS.items():
        for grad in (False, True):
            x = torch.randn(4, 8, 2, 2, device=device, requires_grad=grad)
            native = nn.BatchNorm2d(8).to(device).train(train)
            ours = nn.BatchNorm2d(8).to(device).train()
            native.num_batches_tracked.fill_(10)
            ours.num_batches_tracked.fill_(10)
            bnctl.apply(ours, preset)
            a = timed(lambda m=native, x=x: m(x), device, n=2000, rounds=5)
            b = timed(lambda m=ours, x=x: m(x), device, n=2000, rounds=5)
            print(f"{preset:<16} {str(grad):<7} {a:8.1f} {b:8.1f} {b - a:+8.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fused = kernels.usable(torch.zeros(1, device=device))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fused Triton update: {fused}")
    x = torch.randn(32, 256, 14, 14, device=device, requires_grad=True)
    g = torch.randn_like(x)
    native = nn.BatchNorm2d(256).to(device).train()
    ours = bnctl.BatchNorm2d(256).to(device).train()

    def fwd(m):
        return lambda: m(x)

    def fwd_bwd(m):
        return lambda: m(x).backward(g)

    rows = [("native", native), ("bnctl torch preset", ours)]
    results = {name: (timed(fwd(m), device), timed(fwd_bwd(m), device)) for name, m in rows}
    base = results["native"]
    print(f"device {device}, (32, 256, 14, 14), microseconds per call")
    for name, (f, fb) in results.items():
        print(f"{name:<32} forward {f:8.1f} ({f / base[0]:.2f}x)   forward+backward {fb:8.1f} ({fb / base[1]:.2f}x)")
    fixed_costs(device)


if __name__ == "__main__":
    main()
