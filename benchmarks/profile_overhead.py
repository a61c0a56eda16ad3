"""Where does a bnctl forward spend its time beyond native BatchNorm? (diagnostic, not a test)

Times forward-only and forward+backward of native BatchNorm2d, the bnctl ``torch`` preset,
and the same with the non-finite guard replaced by a plain copy, on one device.

    python benchmarks/profile_overhead.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import bnctl
from bnctl import state


def timed(fn, device, n=200):
    for _ in range(20):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
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
    real_commit = state.copy_if_finite_

    def no_guard(targets, values, nbt):
        chunks = values.split([t.numel() for t in targets])
        torch._foreach_copy_(targets, [c.view_as(t) for c, t in zip(chunks, targets)])
        if nbt is not None:
            nbt.add_(1)
        return True

    state.copy_if_finite_ = no_guard
    try:
        results["bnctl, guard replaced by copy"] = (timed(fwd(ours), device), timed(fwd_bwd(ours), device))
    finally:
        state.copy_if_finite_ = real_commit
    base = results["native"]
    print(f"device {device}, (32, 256, 14, 14), microseconds per call")
    for name, (f, fb) in results.items():
        print(f"{name:<32} forward {f:8.1f} ({f / base[0]:.2f}x)   forward+backward {fb:8.1f} ({fb / base[1]:.2f}x)")


if __name__ == "__main__":
    main()
