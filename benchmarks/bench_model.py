"""A whole fine-tuning step (forward, loss, backward, SGD) of a ResNet-18 under each BatchNorm setup,
against its native baseline in the same run, with a baseline-against-itself row for the noise.

The ResNet-18 is torchvision's architecture written out here (torchvision is not a dependency); with
``--torchvision`` and torchvision installed, torchvision's own ``resnet18``/``resnet50`` is used.
Candidates are interleaved and each is timed as the median of ``--repeat`` steps. Not a test: nothing
is asserted.

    python benchmarks/bench_model.py [--batch 16] [--size 112] [--repeat 15] [--threads 2] [--device cpu|cuda]
                                     [--amp] [--compile] [--torchvision resnet50] [--only torch,running_update,fold]

``--only`` keeps the setups whose names contain one of the given words (and the baselines they are
compared with): compiling every setup of a ResNet-50 takes minutes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bnctl

# Presets compared with native BatchNorm in train() (the frozen ones have baselines of their own).
PRESETS_TRAIN = ("torch", "running_update", "renorm", "batch_no_update", "test_time", "recalibrate")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(norm: Callable[[int], nn.Module] = nn.BatchNorm2d, classes: int = 10) -> nn.Module:
    layers, cin = [], 64
    for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        layers.append(BasicBlock(cin, cout, stride, norm))
        cin = cout
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d, written out: buffers only, scale and shift."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for k, v in [("weight", torch.ones(n)), ("bias", torch.zeros(n)), ("running_mean", torch.zeros(n)),
                     ("running_var", torch.ones(n))]:
            self.register_buffer(k, v)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


def build(args: argparse.Namespace, frozen: bool = False) -> nn.Module:
    norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    if args.torchvision:
        import torchvision

        model = getattr(torchvision.models, args.torchvision)(weights=None, norm_layer=norm, num_classes=10)
    else:
        model = resnet18(norm)
    torch.manual_seed(0)
    with torch.no_grad():  # "pretrained" statistics and affine values
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) or type(m).__name__ == "FrozenBatchNorm2d":
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def setups(args: argparse.Namespace) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (model, train mode). Every conv and linear layer learns in every setup."""
    base = build(args)

    def bnctl_model(preset: str, folded: bool = False) -> tuple[nn.Module, bool]:
        model = copy.deepcopy(base)
        bnctl.apply(model, preset)
        if folded:
            bnctl.fold(model)
        return model, True

    out = {"native BN train": (copy.deepcopy(base), True), "native BN train (again)": (copy.deepcopy(base), True)}
    out.update({f"bnctl {preset}": bnctl_model(preset) for preset in PRESETS_TRAIN})
    out["FrozenBatchNorm2d"] = (build(args, frozen=True), True)
    out["native BN eval, affine learns"] = (copy.deepcopy(base), False)
    for preset in ("frozen", "frozen_stats"):
        out[f"bnctl {preset}"] = bnctl_model(preset)
        out[f"bnctl {preset} + fold"] = bnctl_model(preset, folded=True)
    return out


def step_fn(model: nn.Module, training: bool, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    model.to(device).train(training)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    forward = torch.compile(model) if args.compile else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                            enabled=args.amp):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--torchvision", default=None, help="a torchvision model name, e.g. resnet50")
    parser.add_argument("--only", default=None, help="comma-separated words: keep the setups naming one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = [("native BN train", ["native BN train (again)", *(f"bnctl {p}" for p in PRESETS_TRAIN)]),
            ("FrozenBatchNorm2d", ["bnctl frozen", "bnctl frozen + fold"]),
            ("native BN eval, affine learns", ["bnctl frozen_stats", "bnctl frozen_stats + fold"])]
    if args.only:
        words = args.only.split(",")
        rows = [(base, [n for n in names if "again" in n or any(w in n for w in words)]) for base, names in rows]
        rows = [(base, names) for base, names in rows if len(names) > ("again" in " ".join(names))]
    keep = {name for base, names in rows for name in (base, *names)}
    steps = {name: step_fn(m, training, args, device) for name, (m, training) in setups(args).items()
             if name in keep}
    for step in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeat):  # interleaved, so drift hits every candidate alike
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {device}, {args.threads} threads, {args.torchvision or 'resnet18'}, "
          f"batch {args.batch} at {args.size} px, amp={args.amp}, compile={args.compile}; median of {args.repeat}")
    for baseline, names in rows:
        print(f"{baseline:32s} {med[baseline] * 1e3:8.1f} ms")
        for name in names:
            print(f"  {name:30s} {med[name] * 1e3:8.1f} ms   {med[name] / med[baseline]:.3f}x")


if __name__ == "__main__":
    main()
