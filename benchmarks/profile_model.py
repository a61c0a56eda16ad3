"""Where a model step under a bnctl preset spends GPU time beyond native BatchNorm (diagnostic).

Profiles a few training steps of torchvision's ResNet-50 (AMP, channels_last) with native BatchNorm
and under each preset given, and prints the CUDA kernels whose total time differs most, and the
number of kernel launches and synchronizations per step.

    python benchmarks/profile_model.py [--presets torch,running_update] [--batch 128]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402

import bnctl  # noqa: E402


def kernels_of(step, steps: int = 3) -> tuple[Counter, Counter, Counter]:
    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    times, counts, syncs = Counter(), Counter(), Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name[:90]] += e.device_time_total / steps
            counts[e.name[:90]] += 1 / steps
        elif "Synchronize" in e.name or "Memcpy" in e.name or e.name in ("aten::item", "aten::_local_scalar_dense"):
            syncs[e.name] += 1 / steps
    return times, counts, syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="torch,running_update")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no CUDA kernels)")
    args = parser.parse_args()
    ns = argparse.Namespace(torchvision=args.model, batch=args.batch, size=args.size, amp=True, compile=False)
    device = torch.device(args.device)
    base = bench_model.build(ns)
    native = kernels_of(bench_model.step_fn(copy.deepcopy(base), True, ns, device))
    print(f"torch {torch.__version__}, {args.model}, batch {args.batch}, AMP, channels_last; per step")
    print(f"native: {sum(native[0].values()) / 1e3:.2f} ms of kernels, {sum(native[1].values()):.0f} launches, "
          f"synchronizing or copying calls {dict(native[2])}")
    for preset in args.presets.split(","):
        model = copy.deepcopy(base)
        bnctl.apply(model, preset)
        got = kernels_of(bench_model.step_fn(model, True, ns, device))
        print(f"\n{preset}: {sum(got[0].values()) / 1e3:.2f} ms of kernels, {sum(got[1].values()):.0f} launches, "
              f"synchronizing or copying calls {dict(got[2])}; kernels differing most (us per step, launches):")
        names = set(native[0]) | set(got[0])
        diff = sorted(names, key=lambda n: -abs(got[0][n] - native[0][n]))
        for n in diff[:12]:
            print(f"  {got[0][n] - native[0][n]:+9.1f} us  {native[1][n]:5.0f} -> {got[1][n]:5.0f}  {n}")


if __name__ == "__main__":
    main()
