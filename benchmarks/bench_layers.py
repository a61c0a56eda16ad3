"""Forward+backward cost of bnctl layers against native torch.nn.BatchNorm2d, same run.

Prints one row per (shape, memory format) with the median time of the native
baseline and each candidate's ratio to it. A torch-against-itself row shows the
noise. Not a test: nothing is asserted.

    python benchmarks/bench_layers.py [--threads 2] [--repeat 15] [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import bnctl

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (8, 64, 112, 112), (256, 512, 7, 7)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(layer, x, grad, repeat, device):
    """Median seconds of one forward+backward (input, weight and bias gradients)."""
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    for _ in range(3):
        step()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pretrained(c, device):
    bn = nn.BatchNorm2d(c).to(device)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(100)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def candidates(c, device):
    base = pretrained(c, device)

    def copy_with(policy, training):
        layer = copy.deepcopy(base)
        if policy is not None:
            bnctl.apply(layer, policy)
        return layer.train(training)

    # (label, baseline layer, candidate layer)
    return [
        ("torch vs itself (train)", copy_with(None, True), copy_with(None, True)),
        ("torch preset vs nn train", copy_with(None, True), copy_with("torch", True)),
        ("frozen vs nn eval", copy_with(None, False), copy_with("frozen", True)),
        ("frozen_stats vs nn eval", copy_with(None, False), copy_with("frozen_stats", True)),
        ("running_update vs nn train", copy_with(None, True), copy_with("running_update", True)),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="first shape, 5 repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeat = 5 if args.quick else args.repeat
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"float32, forward+backward, median of {repeat}")
    print(f"{'shape':<20} {'format':<14} {'comparison':<28} {'base ms':>8} {'ours ms':>8} {'ratio':>6}")
    for shape in shapes:
        for fmt in (torch.contiguous_format, torch.channels_last):
            fmt_name = "NCHW" if fmt is torch.contiguous_format else "channels_last"
            x = torch.randn(shape, device=device).to(memory_format=fmt).requires_grad_()
            grad = torch.randn_like(x)
            for label, base, ours in candidates(shape[1], device):
                # interleave the two so drift affects both alike
                tb, to = [], []
                for _ in range(3):
                    tb.append(measure(base, x, grad, repeat, device))
                    to.append(measure(ours, x, grad, repeat, device))
                b, o = min(tb), min(to)
                print(f"{str(shape):<20} {fmt_name:<14} {label:<28} {b * 1e3:8.2f} {o * 1e3:8.2f} "
                      f"{o / b:6.2f}", flush=True)


if __name__ == "__main__":
    main()
