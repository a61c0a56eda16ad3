"""Shared test helpers: a plain float64 reference and per-dtype tolerances."""

from __future__ import annotations

import builtins
import warnings

import pytest
import torch

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
