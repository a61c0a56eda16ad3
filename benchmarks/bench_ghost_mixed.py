"""Ghost batches and mixed-domain batches: layer forward+backward against native torch.nn.BatchNorm2d, same run.

Shape (issue 23): batch 256 x 64 channels x 16x16, float32, ghost size 32; mixed batches of two domains,
labels sorted by domain (views, one concatenation) or shuffled (gathers). For comparison, ghost batches the
way they are usually written by hand (a loop over the slices plus a separate statistics pass for the running
update, as TabNet's and similar implementations do). A torch-against-itself row shows the noise. Not a test.

    python benchmarks/bench_ghost_mixed.py [--threads 2] [--repeat 15]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
import torch.nn.functional as F
from bench_layers import measure, pretrained  # (run as a script: benchmarks/ is on the path)
from torch import nn

import bnctl

SHAPE, GHOST = (256, 64, 16, 16), 32


class GhostByHand(nn.BatchNorm2d):
    """Ghost batch normalization as commonly hand-written: torch's BatchNorm per slice, then the running
    statistics from a second pass over the whole batch."""

    def forward(self, x):
        out = torch.cat([F.batch_norm(s, None, None, self.weight, self.bias, True, 0.0, self.eps)
                         for s in x.split(GHOST)])
        with torch.no_grad():
            var, mean = torch.var_mean(x, (0, 2, 3))
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
            self.num_batches_tracked.add_(1)
        return out


class Mixed(nn.Module):
    """A layer with two domains run inside ``bnctl.domain(layer, labels)``."""

    def __init__(self, layer, labels):
        super().__init__()
        self.layer, self.labels = layer, labels

    def forward(self, x):
        with bnctl.domain(self.layer, self.labels):
            return self.layer(x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base = pretrained(SHAPE[1], device)

    def layer(policy=None, training=True, domains=False):
        bn = copy.deepcopy(base)
        if domains:
            bnctl.add_domains(bn, "target")
        if policy is not None:
            bnctl.apply(bn, policy)
        return bn.train(training)

    by_hand = GhostByHand(SHAPE[1])
    by_hand.load_state_dict(base.state_dict())
    ghost = dataclasses.replace(bnctl.PRESETS["torch"], ghost=GHOST)
    half = SHAPE[0] // 2
    sorted_labels = ["default"] * half + ["target"] * half
    shuffled = torch.randperm(SHAPE[0], generator=torch.Generator().manual_seed(0)) % 2  # indices, unsorted
    rows = [
        ("torch vs itself (train)", layer(), layer()),
        (f"ghost {GHOST} vs nn train", layer(), layer(ghost)),
        (f"ghost {GHOST} by hand vs nn train", layer(), by_hand.train()),
        ("mixed, 2 domains sorted vs nn train", layer(), Mixed(layer(domains=True), sorted_labels).train()),
        ("mixed, 2 domains shuffled vs nn train", layer(), Mixed(layer(domains=True), shuffled).train()),
        ("mixed, 2 domains shuffled vs nn eval", layer(training=False),
         Mixed(layer(domains=True, training=False), shuffled).eval()),
    ]
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, float32 {SHAPE}, forward+backward, "
          f"best of 3 medians of {args.repeat}")
    print(f"{'comparison':<40} {'base ms':>8} {'ours ms':>8} {'ratio':>6}")
    x = torch.randn(SHAPE, device=device).requires_grad_()
    grad = torch.randn_like(x)
    for label, native, ours in rows:
        tb, to = [], []
        for _ in range(3):  # interleaved, so drift affects both alike
            tb.append(measure(native, x, grad, args.repeat, device))
            to.append(measure(ours, x, grad, args.repeat, device))
        b, o = min(tb), min(to)
        print(f"{label:<40} {b * 1e3:8.2f} {o * 1e3:8.2f} {o / b:6.2f}", flush=True)


if __name__ == "__main__":
    main()
