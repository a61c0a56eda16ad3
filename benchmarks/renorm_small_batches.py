"""Batch Renormalization against plain BatchNorm with tiny or non-i.i.d. batches.

Trains the small CNN of examples/tent.py on synthetic 8x8 bar images with
(a) i.i.d. batches of 32, (b) tiny i.i.d. batches of 2, (c) non-i.i.d. batches
of 8 drawn from a single class each, under the ``torch`` preset and under
``renorm`` (warm-up shortened to the run's length), and reports eval-mode
accuracy on an i.i.d. held-out set, mean and std over seeds. An experiment,
not a test: nothing is asserted.

    python benchmarks/renorm_small_batches.py [--seeds 3] [--steps 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import bnctl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tent import bars, small_cnn  # noqa: E402


def batch(kind: str, gen: torch.Generator):
    if kind == "iid-32":
        return bars(32, gen)
    if kind == "iid-2":
        return bars(2, gen)
    x, y = bars(64, gen)  # one class per batch
    k = int(torch.randint(0, 4, (1,), generator=gen))
    sel = (y == k).nonzero().flatten()[:8]
    return x[sel], y[sel]


def run(kind: str, policy: str | bnctl.Policy, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = small_cnn()
    bnctl.apply(model, policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = batch(kind, gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x, y = bars(2000, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    renorm = dataclasses.replace(
        bnctl.get_policy("renorm"), renorm_warmup=(args.steps // 10, args.steps // 2)
    )
    print(f"eval accuracy on i.i.d. held-out data, mean ± std over {args.seeds} seeds, "
          f"{args.steps} SGD steps")
    print(f"{'batches':<16} {'torch preset':>16} {'renorm':>16}")
    for kind in ("iid-32", "iid-2", "one-class-8"):
        cells = []
        for policy in ("torch", renorm):
            accs = [run(kind, policy, args.steps, s) for s in range(args.seeds)]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):6.1%} ± {std:5.1%}")
        print(f"{kind:<16} {cells[0]:>16} {cells[1]:>16}", flush=True)


if __name__ == "__main__":
    main()
