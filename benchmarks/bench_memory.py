"""What autograd keeps for backward in one training forward of a ResNet-50 and a ResNet-18, under each
BatchNorm setup, against torchvision's FrozenBatchNorm2d in the same run.

Two counts, both deterministic: the bytes of the distinct storages that autograd saves in one forward
(``torch.autograd.graph.saved_tensors_hooks``; parameters and buffers included, as they are saved too),
and the same without the model's own parameters and buffers (which exist anyway: what the graph keeps
alive beyond the model). With ``--device cuda``, also the peak memory of a forward and backward.
torchvision's models are used when it is installed, else the same architectures written out here.
Not a test: nothing is asserted.

    python benchmarks/bench_memory.py [--size 224] [--batch 2] [--models resnet50,resnet18] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_model import FrozenBatchNorm2d  # (run as a script: benchmarks/ is on the path)
from torch import nn

import bnctl
from bnctl.compare import count_saved

try:
    import torchvision
except ImportError:  # (the architectures are written out below)
    torchvision = None


class Block(nn.Module):
    """torchvision's BasicBlock (``bottleneck=False``) or Bottleneck."""

    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool, norm: Callable[[int], nn.Module]):
        super().__init__()
        cout = width * 4 if bottleneck else width
        if bottleneck:
            convs = [nn.Conv2d(cin, width, 1, bias=False), nn.Conv2d(width, width, 3, stride, 1, bias=False),
                     nn.Conv2d(width, cout, 1, bias=False)]
        else:
            convs = [nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.Conv2d(width, width, 3, 1, 1, bias=False)]
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(norm(c.out_channels) for c in convs)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for k, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            out = bn(conv(out))
            if k < len(self.convs) - 1:
                out = F.relu(out)
        return F.relu(out + identity)


def resnet(depth: int, norm: Callable[[int], nn.Module]) -> nn.Module:
    """ResNet-18 or ResNet-50 as torchvision builds them (10 classes)."""
    if torchvision is not None:
        return getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm, num_classes=10)
    bottleneck = depth == 50
    counts = (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)
    layers, cin = [], 64
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512), counts)):
        for k in range(n):
            layers.append(Block(cin, width, 2 if stage and not k else 1, bottleneck, norm))
            cin = width * 4 if bottleneck else width
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def frozen_norm() -> Callable[[int], nn.Module]:
    return torchvision.ops.FrozenBatchNorm2d if torchvision is not None else FrozenBatchNorm2d


def build(depth: int, frozen: bool = False) -> nn.Module:
    model = resnet(depth, frozen_norm() if frozen else nn.BatchNorm2d)
    torch.manual_seed(0)
    with torch.no_grad():  # "pretrained" statistics and affine values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def statically_folded(model: nn.Module) -> nn.Module:
    """Every conv -> BatchNorm pair that bnctl.fold finds, folded once into the conv's weight and bias (the
    BatchNorm replaced by nn.Identity): what a hand-written static fold keeps, the floor."""
    model = copy.deepcopy(model).eval()
    handle = bnctl.fold(model)
    handle.remove()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in handle.pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            parent_name, _, attr = bn_name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, attr, nn.Identity())
    return model


def setups(depth: int) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (model, train mode). Every conv and linear layer learns in every setup."""
    base = build(depth)

    def bnctl_model(preset: str, prefer: str | None = None) -> tuple[nn.Module, bool]:
        model = copy.deepcopy(base)
        bnctl.apply(model, preset)
        if prefer is not None:
            bnctl.fold(model, prefer=prefer)
        return model, True

    return {
        "FrozenBatchNorm2d": (build(depth, frozen=True), True),
        "eval BN, affine learns": (copy.deepcopy(base), False),
        "bnctl frozen": bnctl_model("frozen"),
        "bnctl frozen + fold": bnctl_model("frozen", "memory"),
        "bnctl frozen + fold(prefer=time)": bnctl_model("frozen", "time"),
        "bnctl frozen_stats": bnctl_model("frozen_stats"),
        "bnctl frozen_stats + fold": bnctl_model("frozen_stats", "memory"),
        "bnctl frozen_stats + fold(prefer=time)": bnctl_model("frozen_stats", "time"),
        "static fold (no BatchNorm)": (statically_folded(base), True),
    }


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves in one forward: all of them, and those that are not the
    model's own parameters or buffers (:func:`bnctl.compare.count_saved`, what ``bnctl.compare`` reports)."""
    with count_saved(model) as saved:
        model(x)
    return saved.total, saved.activations


def peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak CUDA memory of a forward and backward, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model(x).sum().backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--models", default="resnet50,resnet18")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"torch {torch.__version__}, {device}, {'torchvision' if torchvision else 'written-out'} models, "
          f"batch {args.batch} at {args.size} px; saved for backward in one train() forward, MB (1e6 bytes), "
          "and ratios to FrozenBatchNorm2d (to eval-mode BN with learning affine)")
    for name in args.models.split(","):
        depth = int(name.removeprefix("resnet"))
        rows = {}
        for setup, (model, training) in setups(depth).items():
            model.to(device).train(training)
            rows[setup] = (*saved_bytes(model, x), peak_bytes(model, x) if device.type == "cuda" else None)
        base, evalbn = rows["FrozenBatchNorm2d"], rows["eval BN, affine learns"]
        print(f"\n{name}{'':37s} {'all storages':>28s}   {'without params/buffers':>28s}"
              + ("   peak fwd+bwd" if device.type == "cuda" else ""))
        for setup, (total, alive, peak) in rows.items():
            line = (f"  {setup:40s} {total / 1e6:8.2f} MB {total / base[0]:6.3f}x ({total / evalbn[0]:5.3f}x)"
                    f"   {alive / 1e6:8.2f} MB {alive / base[1]:6.3f}x ({alive / evalbn[1]:5.3f}x)")
            if peak is not None:
                line += f"   {peak / 1e6:8.1f} MB {peak / base[2]:6.3f}x"
            print(line)


if __name__ == "__main__":
    main()
