"""What each BatchNorm setting really does, measured on a small CNN.

The forum question: are ``bn.eval()`` and ``bn.train()`` + ``momentum=0`` +
``requires_grad=False`` the same? This runs three real SGD steps under each
setting and under bnctl's presets, and reports what happened.

    python examples/forum_settings.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import bnctl


def pretrained_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    with torch.no_grad():  # give the BatchNorm layer "pretrained" statistics
        for _ in range(20):
            model.train()(torch.randn(32, 1, 8, 8) * 2 + 1)
    return model


def forum_eval(model: nn.Module) -> None:
    model[1].eval()


def forum_momentum0(model: nn.Module) -> None:
    bn = model[1]
    bn.train()
    bn.momentum = 0.0
    bn.weight.requires_grad = False
    bn.bias.requires_grad = False


def normalizes_with(model: nn.Module, h: torch.Tensor) -> str:
    """Which statistics the BatchNorm layer normalizes ``h`` with right now (nothing updated)."""
    bn = model[1]
    with torch.no_grad(), bnctl.no_update(model):
        out = bn(h)
        running = nn.functional.batch_norm(
            h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        batch = nn.functional.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    if torch.allclose(out, running):
        return "running"
    return "batch" if torch.allclose(out, batch) else "other"


def measure(setting) -> dict[str, str]:
    model = pretrained_model().train()
    bn = model[1]
    if isinstance(setting, str):
        bnctl.apply(model, setting)
    else:
        setting(model)
    before = copy.deepcopy(bn.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 1, 8, 8, generator=gen) * 3 - 1
        y = torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = copy.deepcopy(bn.state_dict())
    h = model[0](torch.randn(16, 1, 8, 8, generator=gen)).detach()
    used = normalizes_with(model, h)
    model.train()  # what a trainer loop does at the start of every epoch
    survives = normalizes_with(model, h) == used
    model.eval()
    same_eval = normalizes_with(model, h) == used
    changed = lambda k: "yes" if not torch.equal(before[k], after[k]) else "no"  # noqa: E731
    return {
        "normalizes with": used,
        "running stats": changed("running_mean"),
        "num_batches_tracked": changed("num_batches_tracked"),
        "weight/bias": changed("weight"),
        "train == eval": "yes" if same_eval else "no",
        "survives .train()": "yes" if survives else "no",
    }


def main() -> None:
    settings = [
        ("bn.eval()", forum_eval),
        ("train+momentum=0+no grad", forum_momentum0),
        *[(f"bnctl '{name}'", name) for name in
          ("torch", "frozen", "frozen_stats", "running_update", "batch_no_update")],
    ]
    rows = [(label, measure(s)) for label, s in settings]
    cols = list(rows[0][1])
    widths = [max(len(c), 7) for c in cols]
    print("Three SGD steps on a small CNN; what changed in its BatchNorm layer (measured):\n")
    print(f"{'setting':<27}" + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for label, row in rows:
        print(f"{label:<27}" + "  ".join(f"{row[c]:>{w}}" for c, w in zip(cols, widths)))
    print("\nbn.eval() is undone by the next model.train(); 'train+momentum=0' still normalizes")
    print("with batch statistics and counts batches. bnctl's presets hold under model.train().")


if __name__ == "__main__":
    main()
