"""Autograd functions of bnctl.

One function lives here: normalization with given per-channel statistics,

.. math:: y = (x - \\mu) \\cdot \\frac{w}{\\sqrt{\\sigma^2 + \\epsilon}} + b

with PyTorch's eval-mode kernel forward and a backward that also gives the
gradients of ``mu`` and ``sigma2`` (PyTorch's kernel treats them as constants).
With statistics computed from the batch by differentiable torch ops, autograd
chains through it to give blended ("prior") BatchNorm its gradient. Constant
statistics (the running buffers) go through PyTorch's own kernel instead,
which measured faster on the CPU (see benchmarks/).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import reduce_dims

__all__ = ["normalize_with_stats"]


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """Reshape a ``(C,)`` tensor so it broadcasts against ``(N, C, *)``."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


class _NormalizeWithStats(torch.autograd.Function):
    """``y = x * scale + shift`` with ``scale = w / sqrt(var + eps)``, ``shift = b - mean * scale``.

    Backward, per channel, with ``S1 = sum(dy)`` and ``Sx = sum(dy * x)``:

    * ``dx = dy * scale``
    * ``dw = invstd * (Sx - mean * S1)`` (that is, ``sum(dy * x_hat)``)
    * ``db = S1``
    * ``dmean = -scale * S1``
    * ``dvar = -0.5 * invstd**2 * w * (Sx - mean * S1) * invstd``
    """

    @staticmethod
    def forward(
        x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        # PyTorch's own eval-mode kernel: the output is bit-identical to
        # F.batch_norm(..., training=False) with these statistics.
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, mean, var, weight, _bias, eps = inputs
        ctx.eps = eps
        # The inputs themselves, so that double backward can differentiate through them.
        ctx.save_for_backward(x, mean, var, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # Written with differentiable torch ops: under create_graph=True autograd
        # differentiates this backward too (double backward).
        x, mean, var, weight = ctx.saved_tensors
        need_x, need_mean, need_var, need_w, need_b, _ = ctx.needs_input_grad
        ndim = grad_out.dim()
        dims = reduce_dims(ndim)
        invstd = torch.rsqrt(var + ctx.eps)
        scale = invstd if weight is None else invstd * weight
        grad_x = grad_mean = grad_var = grad_w = grad_b = None
        if need_x:
            grad_x = (grad_out * _channel_view(scale, ndim).to(grad_out.dtype)).to(x.dtype)
        if need_mean or need_var or need_w or need_b:
            # Accumulate the reductions in at least float32 (bfloat16 inputs under autocast).
            acc = torch.promote_types(grad_out.dtype, torch.float32)
            sum_dy = grad_out.sum(dims, dtype=acc)
            if need_var or need_w:
                sum_dy_x = (grad_out * x).sum(dims, dtype=acc)
                sum_dy_xhat = (sum_dy_x - mean * sum_dy) * invstd
            if need_w:
                grad_w = sum_dy_xhat.to(weight.dtype)
            if need_b:
                grad_b = sum_dy.to(weight.dtype if weight is not None else sum_dy.dtype)
            if need_mean:
                grad_mean = -scale * sum_dy
            if need_var:
                w = 1.0 if weight is None else weight
                grad_var = -0.5 * w * invstd * invstd * sum_dy_xhat
        return grad_x, grad_mean, grad_var, grad_w, grad_b, None


def normalize_with_stats(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Normalize ``x`` with the given per-channel statistics, then scale and shift.

    .. math:: y = \\frac{x - \\mathrm{mean}}{\\sqrt{\\mathrm{var} + \\epsilon}} \\cdot w + b

    Gradients flow to every tensor argument that requires them, to any
    order (the backward is itself differentiable). The arguments are saved
    for backward as they are: modifying them in place before backward makes
    autograd raise, as for any torch op.

    Args:
        x: input of shape ``(N, C, *)``.
        mean: ``(C,)`` means.
        var: ``(C,)`` biased variances.
        weight: ``(C,)`` scale, or ``None``.
        bias: ``(C,)`` shift, or ``None``.
        eps: added to the variance.

    Returns:
        A tensor of the shape, dtype and memory format of ``x``.

    Example:
        >>> x = torch.randn(4, 3, 2, 2)
        >>> y = normalize_with_stats(x, torch.zeros(3), torch.full((3,), 4.0), eps=1e-5)
        >>> torch.allclose(y, x / 2)
        True
    """
    return _NormalizeWithStats.apply(x, mean, var, weight, bias, eps)
