"""The forum's question, answered by measurement on a small CNN (no extra packages).

Are ``bn.eval()`` and ``bn.train()`` + ``momentum=0`` + ``requires_grad=False``
the same? Three real SGD steps under each setting and under bnctl's presets;
``bnctl demo`` does the same on real digits, and more.

    python examples/forum_settings.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnctl.demo import PART_A_SETTINGS, format_part_a, measure_setting


def main() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    with torch.no_grad():  # "pretrained" statistics
        for _ in range(20):
            base.train()(torch.randn(32, 1, 8, 8) * 2 + 1)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 8, 8, generator=gen) * 3 - 1,
                torch.randint(0, 4, (16,), generator=gen)) for _ in range(3)]
    probe = torch.randn(16, 1, 8, 8, generator=gen)
    rows = []
    for label, setting in PART_A_SETTINGS:
        model = copy.deepcopy(base)
        rows.append({"setting": label, **measure_setting(model, model[1], setting, batches, probe)})
    print("Three SGD steps on a small CNN; what happened to its BatchNorm layer (measured):\n")
    print(format_part_a(rows))


if __name__ == "__main__":
    main()
