"""How stably does ``running_update`` train, against the ``torch`` preset, across learning rates?

``running_update`` normalizes with the running statistics while updating them
from the batch, so no gradient flows through the statistics: nothing keeps a
layer's input centred and scaled while the weights before it move. This
fine-tunes the demo's small CNN (pretrained on scikit-learn's digits with
batch statistics) on a shifted copy of the digits (low contrast) with SGD
(momentum 0.9) at several learning rates, and reports per setting: held-out
target accuracy in eval(), the final training loss, the runs that diverged
(a non-finite loss), and the running-statistics updates skipped for
non-finite batch statistics. Mean over seeds. An experiment, not a test:
nothing is asserted. Needs the demo extra (scikit-learn).

    python benchmarks/running_update_stability.py [--seeds 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import warnings

import torch
import torch.nn.functional as F

import bnctl
from bnctl.demo import SHIFTS, load_digits, small_cnn, train

SETTINGS = {
    "torch": "torch",
    "running_update": "running_update",
    "running_update, momentum 0.01": bnctl.Policy("running", "ema", "running", "none", momentum=0.01),
    "blend 0.5 + ema": bnctl.Policy(0.5, "ema", "running", "none"),
}
LEARNING_RATES = (0.001, 0.01, 0.05)


def finetune(source: torch.nn.Module, policy, lr: float, data, steps: int, seed: int) -> dict[str, float]:
    (xa, ya), (xt, yt) = data
    model = copy.deepcopy(source)
    bnctl.apply(model, policy)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped updates are counted below
        for _ in range(steps):
            idx = torch.randperm(len(xa), generator=gen)[:32]
            opt.zero_grad()
            loss = F.cross_entropy(model(xa[idx]), ya[idx])
            if not math.isfinite(loss.item()):
                break
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad(), bnctl.no_update(model):
            acc = (model(xt).argmax(1) == yt).float().mean().item()
    skipped = sum(getattr(m, "skipped_updates", 0) for m in model.modules())
    return {"acc": acc, "loss": loss.item(), "diverged": float(not math.isfinite(loss.item())),
            "skipped": float(skipped)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    x, y = load_digits()
    shift = SHIFTS["low_contrast"][1]
    print(f"torch {torch.__version__}; fine-tuning on low-contrast digits, SGD momentum 0.9, {args.steps} steps "
          f"of 32, mean over {args.seeds} seeds")
    print(f"{'setting':<32} {'lr':>6} {'target acc':>10} {'final loss':>10} {'diverged':>8} {'skipped':>8}")
    results: dict[tuple[str, float], list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(x), generator=gen)
        src, tgt, test = order[:900], order[900:1350], order[1350:]
        torch.manual_seed(seed)
        source = train(small_cnn(), x[src], y[src], epochs=10, seed=seed)
        data = ((shift(x[tgt], seed), y[tgt]), (shift(x[test], seed), y[test]))
        for name, policy in SETTINGS.items():
            for lr in LEARNING_RATES:
                results.setdefault((name, lr), []).append(finetune(source, policy, lr, data, args.steps, seed))
    for (name, lr), runs in results.items():
        finite = [r["loss"] for r in runs if math.isfinite(r["loss"])]
        loss = f"{statistics.mean(finite):10.3f}" if finite else f"{'nan':>10}"
        print(f"{name:<32} {lr:>6g} {statistics.mean(r['acc'] for r in runs):10.1%} {loss} "
              f"{int(sum(r['diverged'] for r in runs)):>5}/{len(runs):<2} "
              f"{statistics.mean(r['skipped'] for r in runs):8.1f}")


if __name__ == "__main__":
    main()
