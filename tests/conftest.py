"""Shared test helpers: a plain reference, per-dtype tolerances, small models, look-alikes."""

from __future__ import annotations

import builtins
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnctl
from bnctl import Mode
from bnctl.functional import batch_norm
from bnctl.policy import make_step

# tests/integrations run against the real torchvision, timm, onnxruntime and Lightning
# (`make test-integrations`, a separate environment); CI's environment has none of them.
collect_ignore = [] if importlib.util.find_spec("torchvision") else ["integrations"]

# Tolerances for comparisons against references, per dtype (torch.testing defaults are
# tighter than reductions over ~1e5 values allow in float32).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def reference_bn(x, running_mean, running_var, weight, bias, normalize, eps=1e-5, rmax=3.0, dmax=5.0):
    """BatchNorm written plainly with torch ops (autograd gives the reference gradient).

    ``normalize``: "batch", "running", "renorm" or a blend weight. Running statistics and
    the renorm r/d are constants.
    """
    dims = reduce_dims(x)
    mean_b = x.mean(dims)
    var_b = ((x - view(mean_b, x)) ** 2).mean(dims)
    if normalize == "batch":
        mu, var = mean_b, var_b
        xhat = (x - view(mu, x)) / torch.sqrt(view(var, x) + eps)
    elif normalize == "running":
        xhat = (x - view(running_mean, x)) / torch.sqrt(view(running_var, x) + eps)
    elif normalize == "renorm":
        std_r = torch.sqrt(running_var + eps)
        r = (torch.sqrt(var_b.detach() + eps) / std_r).clamp(1 / rmax, rmax)
        d = ((mean_b.detach() - running_mean) / std_r).clamp(-dmax, dmax)
        xhat = (x - view(mean_b, x)) / torch.sqrt(view(var_b, x) + eps) * view(r, x) + view(d, x)
    else:
        a = float(normalize)
        mu = a * mean_b + (1 - a) * running_mean
        var = a * var_b + (1 - a) * running_var
        xhat = (x - view(mu, x)) / torch.sqrt(view(var, x) + eps)
    if weight is not None:
        xhat = xhat * view(weight, x)
    if bias is not None:
        xhat = xhat + view(bias, x)
    return xhat


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def block_imports(monkeypatch, prefix: str) -> None:
    """Make ``import <prefix>...`` fail, as if the package were not installed."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith(prefix):
            raise ImportError(f"no {prefix} (blocked by the test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


# -- small models and data shared by several test files -------------------------------------


def make_model():
    """Conv-BN-ReLU-Dropout-Conv-BN on 2-channel 5x5 inputs (fixed seed)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
    )


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g) * 3 + 2


# Every (normalize, update) combination a layer can run, for gradient and device tests.
MODES = [
    ("batch", "ema"),
    ("batch", "none"),
    ("batch", "cumulative"),
    ("running", "none"),
    ("running", "ema"),
    ("renorm", "ema"),
    (0.3, "none"),
    (0.7, "ema"),
]


def make_inputs(shape, dtype=torch.float64, affine=True):
    """(x, running_mean, running_var, weight, bias) with x, weight and bias requiring grad."""
    c = shape[1]
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).requires_grad_()
    rm = torch.randn(c, dtype=dtype) * 0.5
    rv = torch.rand(c, dtype=dtype) + 0.5
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=dtype).requires_grad_() if affine else None
    return x, rm, rv, w, b


RENORM_LIMITS = (1.5, 0.5)  # r_max, d_max used with make_inputs/ours (reference_bn's rmax, dmax)


def ours(x, rm, rv, w, b, mode):
    """bnctl's functional batch_norm on fresh copies of the buffers (repeated calls see one function)."""
    acc = bnctl.Accumulator.empty(x.shape[1], x.device) if mode[1] == "cumulative" else None
    step = make_step(Mode(*mode), 0.1, renorm=(*RENORM_LIMITS, (0, 0)))
    return batch_norm(
        x, rm.clone(), rv.clone(), w, b, mode=step, accumulator=acc,
        num_batches_tracked=torch.tensor(0, device=x.device),
    )


class KeywordModel(nn.Module):
    """A model called with a keyword argument (dict batches)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, inputs):
        return self.bn(inputs)


def trained_state():
    """A state dict with two BatchNorm layers (1: 2d, 4: 1d) after one training batch."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3),
                      nn.BatchNorm1d(3))
    m.train()(torch.randn(8, 1, 4, 4))
    return m.state_dict()


# -- look-alikes of other libraries' layers (CI has neither timm nor torchvision) ----------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style look-alike: BatchNorm computed inside forward, then dropout and activation."""

    def __init__(self, n):
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps,
        )
        return self.act(self.drop(x))


class SuperAct2d(nn.BatchNorm2d):
    """A subclass whose forward delegates to super().forward and adds an activation."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops look-alike: buffers only, not a _BatchNorm; scale-and-shift forward."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for k, v in [("weight", torch.ones(n)), ("bias", torch.zeros(n)),
                     ("running_mean", torch.zeros(n)), ("running_var", torch.ones(n))]:
            self.register_buffer(k, v)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm look-alike: FrozenBatchNorm2d, then dropout and activation."""

    def __init__(self, n, eps=1e-5):
        super().__init__(n, eps)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d look-alike (module and class name as in timm): F.batch_norm inside its
    own forward, then dropout and activation."""

    def __init__(self, n, act=None):
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = nn.ReLU() if act is None else act

    def forward(self, x):
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or self.running_mean is None, exponential_average_factor, self.eps)
        return self.act(self.drop(x))


class TimmSplitBatchNorm2d(nn.BatchNorm2d):
    """timm's SplitBatchNorm2d look-alike: in train(), split k of the batch goes through aux_bn[k-1]."""

    def __init__(self, n, num_splits=2):
        super().__init__(n)
        self.num_splits = num_splits
        self.aux_bn = nn.ModuleList([nn.BatchNorm2d(n) for _ in range(num_splits - 1)])

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        split = input.split(input.shape[0] // self.num_splits)
        return torch.cat([super().forward(split[0])] + [a(s) for a, s in zip(self.aux_bn, split[1:])])


for _cls, _module, _name in [(TimmBatchNormAct2d, "timm.layers.norm_act", "BatchNormAct2d"),
                             (TimmSplitBatchNorm2d, "timm.layers.split_batchnorm", "SplitBatchNorm2d")]:
    _cls.__module__, _cls.__name__, _cls.__qualname__ = _module, _name, _name


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct look-alike: super().forward(), then drop and act if present."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class BatchNormAct1d(nn.BatchNorm1d):
    """BatchNormAct2d's 1-d twin: computes BatchNorm itself, then an activation."""

    def forward(self, x):
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, self.momentum, self.eps))
