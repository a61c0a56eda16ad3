"""What ``bnctl.compare`` costs beyond the training it runs: k settings × n steps of ``compare`` against k × n
plain training steps of the same model on the same batches, measured in the same run.

Two comparisons, each repeated (interleaved with its baseline) and reported as the median ratio:

* ``plain settings``: k settings without a policy (plain ``torch.nn`` layers), so the ratio is the engine alone:
  the deep copy per setting, the seeding, the memory count of the first step, the loss read per step, the
  report of modes and the BatchNorm drift;
* ``default settings``: ``bnctl.compare``'s defaults (torch, frozen, frozen_stats, running_update,
  recalibrate+frozen_stats), so the ratio also holds what the settings themselves cost or save (frozen layers
  are cheaper, recalibration is a pass over the data).

The baseline is a plain loop: ``model.train()``, an optimizer per setting (SGD, lr 1e-3, momentum 0.9, also
given to ``compare``), then per step zero_grad, forward, cross-entropy, backward, step and ``loss.item()``.
Evaluation is timed separately (compare's own timing of it) and left out of the ratio: the acceptance target is
``<= 1.1`` for the plain settings. The model is the ResNet-18 of ``bench_model.py`` (torchvision's architecture
written out). Not a test: nothing is asserted.

    python benchmarks/bench_compare.py [--steps 20] [--batch 16] [--size 32] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from bench_model import resnet18  # (run as a script: benchmarks/ is on the path)
from torch import nn

import bnctl
from bnctl.compare import DEFAULT_SETTINGS, Setting

SGD = functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9)  # the same optimizer on both sides


def plain_steps(model: nn.Module, data: list, settings: int, steps: int) -> float:
    """Seconds for ``settings`` × ``steps`` plain training steps (one optimizer per setting)."""
    start = time.perf_counter()
    model.train()
    for _ in range(settings):
        opt = SGD(model.parameters())
        for x, y in data[:steps]:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            loss.item()
    return time.perf_counter() - start


def compare_steps(model: nn.Module, data: list, val: list, settings: list, steps: int) -> tuple[float, float]:
    """``(seconds of compare without its evaluations, seconds of its evaluations)``."""
    result = bnctl.compare(model, data, val, settings=settings, steps=steps, progress=False, optimizer=SGD)
    failed = [f"{r.name}: {r.status}" for r in result.rows if not r.finished]
    if failed:
        raise RuntimeError(f"compare did not finish: {failed}")
    evaluations = sum(r["eval_seconds"] for r in result.records())
    return result.seconds - evaluations, evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet18()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.batch, 3, args.size, args.size, generator=g),
             torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(args.steps)]
    val = data[:2]
    with torch.no_grad():  # statistics that are not the initial 0 and 1
        for x, _y in data[:4]:
            model.train()(x)
    setups = {
        "plain settings": [Setting(f"plain {i}") for i in range(len(DEFAULT_SETTINGS))],
        "default settings": list(DEFAULT_SETTINGS),
    }
    k, n = len(DEFAULT_SETTINGS), args.steps
    print(f"torch {torch.__version__}, {args.threads} threads; ResNet-18, batch {args.batch} at {args.size} px; "
          f"k = {k} settings x n = {n} steps; median of {args.repeat} interleaved repeats")
    plain_steps(copy.deepcopy(model), data, 1, 3)  # warm-up
    for name, settings in setups.items():
        ratios, base, evals = [], [], []
        for _ in range(args.repeat):
            baseline = plain_steps(copy.deepcopy(model), data, k, n)
            spent, evaluation = compare_steps(model, data, val, settings, n)
            ratios.append(spent / baseline)
            base.append(baseline)
            evals.append(evaluation)
        print(f"  {name:17s} compare / plain k x n steps: {statistics.median(ratios):.3f} "
              f"(runs {', '.join(f'{r:.3f}' for r in ratios)}); plain {statistics.median(base):.2f} s, "
              f"evaluations {statistics.median(evals):.2f} s (left out)")


if __name__ == "__main__":
    main()
