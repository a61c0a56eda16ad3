"""Host cost of one BatchNorm forward: bnctl presets against ``nn.BatchNorm2d`` in the same run.

On a GPU a training step is bound by the host issuing small kernels, so what a layer's forward
costs in Python and dispatch shows up in the step time even where the kernels are the same. This
benchmark measures that cost where the arithmetic is negligible: one ``BatchNorm2d(8)``, input
2 x 8 x 4 x 4 with ``requires_grad=True``, one thread, forward only.

* time: each row times bnctl's layer and the native layer (in the mode the preset is compared
  with) in interleaved blocks, and reports the median of the per-block ratios; a row of native
  against itself shows the noise of the measurement.
* calls: Python calls per forward (cProfile's count of function calls, builtins included), and
  ATen ops per forward (a ``TorchDispatchMode`` count). Both are deterministic.

    python benchmarks/bench_host.py [--blocks 30] [--calls 400]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnctl

# (preset, bnctl layer in train(), native layer in train()): the rows of the table
ROWS = [
    ("torch", True, True),
    ("running_update", True, True),
    ("frozen_stats", True, False),
    ("frozen", True, False),
    ("torch", False, False),
]


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def layers(preset: str, train: bool, native_train: bool) -> tuple[nn.Module, nn.Module]:
    """A warmed native layer, and a copy of it under ``preset``."""
    torch.manual_seed(0)
    native = nn.BatchNorm2d(8).train()
    with torch.no_grad():
        for _ in range(3):
            native(torch.randn(16, 8, 4, 4))
    ours = copy.deepcopy(native)
    bnctl.apply(ours, preset)
    return native.train(native_train), ours.train(train)


def python_calls(layer: nn.Module, x: torch.Tensor, n: int = 200) -> float:
    for _ in range(5):
        layer(x)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        layer(x)
    profile.disable()
    return (pstats.Stats(profile).total_calls - 1) / n  # (less the call of disable itself)


def aten_ops(layer: nn.Module, x: torch.Tensor, n: int = 20) -> float:
    layer(x)
    with _OpCount() as count:
        for _ in range(n):
            layer(x)
    return count.ops / n


def block(layer: nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        layer(x)
    return (time.perf_counter() - start) / calls


def ratio(a: nn.Module, b: nn.Module, x: torch.Tensor, blocks: int, calls: int) -> tuple[float, float, float]:
    """Median over interleaved blocks of time(a) / time(b); and the two median times in microseconds."""
    for _ in range(3):
        block(a, x, calls)
        block(b, x, calls)
    ratios, ta, tb = [], [], []
    for i in range(blocks):
        first, second = (a, b) if i % 2 else (b, a)  # alternate the order within a block pair
        t1, t2 = block(first, x, calls), block(second, x, calls)
        t_a, t_b = (t1, t2) if first is a else (t2, t1)
        ratios.append(t_a / t_b)
        ta.append(t_a)
        tb.append(t_b)
    return statistics.median(ratios), statistics.median(ta) * 1e6, statistics.median(tb) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    print(f"torch {torch.__version__}, 1 thread, BatchNorm2d(8), input {tuple(x.shape)} requires_grad, forward only")
    print(f"{'preset, mode':<26} {'vs native':<11} {'time ratio':>10} {'bnctl us':>9} {'native us':>9} "
          f"{'py calls':>9} {'native':>7} {'aten ops':>9} {'native':>7}")
    reference = nn.BatchNorm2d(8).train()
    same = copy.deepcopy(reference)
    r, t_a, t_b = ratio(same, reference, x, args.blocks, args.calls)
    calls = python_calls(reference, x)
    ops = aten_ops(reference, x)
    print(f"{'native, train()':<26} {'train':<11} {r:10.2f} {t_a:9.1f} {t_b:9.1f} {calls:9.0f} {calls:7.0f} "
          f"{ops:9.0f} {ops:7.0f}")
    for preset, train, native_train in ROWS:
        native, ours = layers(preset, train, native_train)
        r, t_ours, t_native = ratio(ours, native, x, args.blocks, args.calls)
        row = f"{preset}, {'train()' if train else 'eval()'}"
        print(f"{row:<26} {'train' if native_train else 'eval':<11} {r:10.2f} {t_ours:9.1f} {t_native:9.1f} "
              f"{python_calls(ours, x):9.0f} {python_calls(native, x):7.0f} {aten_ops(ours, x):9.0f} "
              f"{aten_ops(native, x):7.0f}")


if __name__ == "__main__":
    main()
