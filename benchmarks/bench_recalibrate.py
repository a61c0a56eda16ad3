"""Cost of bnctl.recalibrate against a plain no_grad forward over the same data, same run.

    python benchmarks/bench_recalibrate.py [--threads 2] [--batches 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import bnctl


def model() -> nn.Module:
    layers, c = [], 3
    for out in (32, 64, 64, 128):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = model()
    data = [torch.randn(32, 3, 32, 32) for _ in range(args.batches)]

    def plain():
        with torch.no_grad():
            for x in data:
                net(x)

    def recal():
        bnctl.recalibrate(net, data, progress=False)

    plain(), recal()  # warm up
    tp, tr = [], []
    for _ in range(5):  # interleaved, best of 5
        t0 = time.perf_counter()
        plain()
        tp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        recal()
        tr.append(time.perf_counter() - t0)
    p, r = min(tp), min(tr)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.batches} batches of (32, 3, 32, 32), 4 conv+BN blocks")
    print(f"plain no_grad forward {p * 1e3:8.1f} ms")
    print(f"recalibrate           {r * 1e3:8.1f} ms   ratio {r / p:.2f}")


if __name__ == "__main__":
    main()
