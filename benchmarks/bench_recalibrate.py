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
    parser.add_argument("--repeat", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = model()
    data = [torch.randn(32, 3, 32, 32) for _ in range(args.batches)]

    def plain():
        with torch.no_grad():
            for x in data:
                net(x)

    def plain_train():  # BatchNorm computing batch statistics, as any recalibration must
        net.train()
        try:
            with torch.no_grad(), bnctl.no_update(net):
                for x in data:
                    net(x)
        finally:
            net.eval()

    def recal():
        bnctl.recalibrate(net, data, progress=False)

    funcs = {"plain no_grad forward (eval)": plain,
             "plain no_grad forward (batch stats)": plain_train,
             "recalibrate": recal}
    times = {k: [] for k in funcs}
    for f in funcs.values():
        f()  # warm up
    for _ in range(args.repeat):  # interleaved, best of N
        for k, f in funcs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.batches} batches of (32, 3, 32, 32), 4 conv+BN blocks, best of {args.repeat}")
    r = best["recalibrate"]
    for k, t in best.items():
        ratio = "" if k == "recalibrate" else f"   recalibrate / this = {r / t:.2f}"
        print(f"{k:<36} {t * 1e3:8.1f} ms{ratio}")


if __name__ == "__main__":
    main()
