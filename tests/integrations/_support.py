"""Helpers shared by the integration tests: small image batches, warmed models, state comparisons, SGD steps.

Models are small and inputs 32x32 (2 CPU cores); everything is seeded, so two copies of a model fed the
same batches must agree bit for bit wherever the same ATen ops run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnctl

PRESETS = sorted(bnctl.PRESETS)
CLASSES = 10


def images(seed: int, n: int = 4, size: int = 32, shift: float = 1.0, scale: float = 2.0) -> torch.Tensor:
    """A seeded batch of ``n`` 3-channel images whose statistics are far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * scale + shift


def labels(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


def warmed(model: nn.Module, n: int = 4, batches: int = 2) -> nn.Module:
    """``model`` after a few no-grad train() forwards, so its running statistics are not the initial 0 and 1."""
    model.train()
    with torch.no_grad():
        for seed in range(100, 100 + batches):
            model(images(seed, n))
    return model


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, detached copies."""
    return {k: v.detach().clone() for k, v in [*module.named_parameters(), *module.named_buffers()]}


def assert_same_state(got: nn.Module | dict, want: nn.Module | dict) -> None:
    """Same parameter and buffer names, each ``torch.equal``."""
    got, want = (state(m) if isinstance(m, nn.Module) else m for m in (got, want))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def applied(model: nn.Module, preset: str) -> nn.Module:
    """A deep copy of ``model`` with ``preset`` applied."""
    model = copy.deepcopy(model)
    bnctl.apply(model, preset)
    return model


def sgd_steps(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor] | None = None, steps: int = 2,
              n: int = 4) -> torch.Tensor:
    """``steps`` SGD steps (cross-entropy) in train() through ``fn`` (default: the model), then one eval()
    forward through ``fn``, whose output is returned."""
    fn = model if fn is None else fn
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for seed in range(steps):
        opt.zero_grad()
        F.cross_entropy(fn(images(seed, n)), labels(seed, n)).backward()
        opt.step()
    model.eval()
    return fn(images(50, n)).detach()
