"""Which BatchNorm setting should fine-tune a pretrained ResNet-18 on a shifted domain? Measured with bnctl.compare.

A torchvision ResNet-18 (``weights=None``: nothing is downloaded) is pretrained on scikit-learn's bundled
handwritten digits (the source domain: 8x8 images upscaled to 32x32, three channels). The target domain is the
same kind of digits scanned with washed-out contrast (``0.3 x + 0.5``), with only 5 labeled images per class
to fine-tune on, in batches of 10 (Adam, lr 1e-4; ``--sgd 1e-3`` for SGD with momentum 0.9 instead).
``bnctl.compare`` fine-tunes a copy of the pretrained model under each BatchNorm setting, from the same weights
and in the same data order, over three seeds, and evaluates each copy on held-out target digits and on
held-out source digits (what fine-tuning made it forget).

    pip install torchvision scikit-learn matplotlib
    python examples/compare_resnet18_digits.py            # about a minute on 2 CPU cores

Writes ``compare_resnet18_digits.txt`` (the table) and ``compare_resnet18_digits.png`` (the plot) next to this
file (``--out DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits

import bnctl

SETTINGS = ["torch", "frozen", "frozen_stats", "running_update", "recalibrate+frozen_stats", "frozen_stats+fold"]


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as 3x32x32 images in [0, 1] and their labels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    return x, torch.tensor(data.target)


def low_contrast(x: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + 0.5


def pretrain(x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    """A ResNet-18 trained from scratch on the source digits (Adam, batches of 64)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 63, 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def few_shot(x: torch.Tensor, y: torch.Tensor, shots: int) -> torch.Tensor:
    """Indices of the first ``shots`` images of each class."""
    return torch.cat([torch.nonzero(y == c).flatten()[:shots] for c in range(10)])


def in_batches(x: torch.Tensor, y: torch.Tensor, size: int = 200) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for the table and plot")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="pretraining epochs on the source digits")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate for fine-tuning")
    parser.add_argument("--sgd", type=float, default=None, metavar="LR",
                        help="fine-tune with SGD (momentum 0.9) at this learning rate instead")
    args = parser.parse_args()
    start = time.perf_counter()

    x, y = digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    source_train, source_test, target = order[:1000], order[1000:1300], order[1300:]
    model = pretrain(x[source_train], y[source_train], args.epochs)
    pretrained_at = time.perf_counter()

    xt, yt = low_contrast(x[target]), y[target]
    shots = few_shot(xt, yt, 5)  # 50 labeled target images...
    held_out = torch.ones(len(xt), dtype=torch.bool)
    held_out[shots] = False  # ...and the other target images to evaluate on
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt[shots], yt[shots]), batch_size=10,
                                        shuffle=True)  # reshuffled from torch's generator: compare seeds it
    result = bnctl.compare(
        model, train,
        {"target": in_batches(xt[held_out], yt[held_out]), "source": in_batches(x[source_test], y[source_test])},
        settings=SETTINGS, steps=args.steps, seeds=list(range(args.seeds)), cycle=True,
        optimizer=functools.partial(torch.optim.Adam, lr=args.lr) if args.sgd is None
        else functools.partial(torch.optim.SGD, lr=args.sgd, momentum=0.9),
    )
    optimizer = f"Adam lr {args.lr:g}" if args.sgd is None else f"SGD lr {args.sgd:g} momentum 0.9"
    header = (f"ResNet-18 (torchvision, weights=None) pretrained on clean digits ({len(source_train)} images, "
              f"{args.epochs} epochs), fine-tuned on {len(shots)} low-contrast target digits (0.3 x + 0.5) in "
              f"batches of 10 ({optimizer});\nevaluated on {int(held_out.sum())} other target digits and "
              f"{len(source_test)} source digits. torch {torch.__version__}, {torch.get_num_threads()} threads, "
              "CPU.\n")
    text = header + "\n" + str(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_resnet18_digits.txt").write_text(text + "\n")
    result.plot(out / "compare_resnet18_digits.png")
    end = time.perf_counter()
    print(f"\npretraining {pretrained_at - start:.0f} s, compare {result.seconds:.0f} s, total {end - start:.0f} s; "
          f"wrote {out / 'compare_resnet18_digits.txt'} and .png")


if __name__ == "__main__":
    main()
