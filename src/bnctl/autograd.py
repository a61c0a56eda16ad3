"""Autograd functions of bnctl.

Two functions live here. Normalization with given per-channel statistics,

.. math:: y = (x - \\mu) \\cdot \\frac{w}{\\sqrt{\\sigma^2 + \\epsilon}} + b

with PyTorch's eval-mode kernel forward and a backward that also gives the
gradients of ``mu`` and ``sigma2`` (PyTorch's kernel treats them as constants).
With statistics computed from the batch by differentiable torch ops, autograd
chains through it to give blended ("prior") BatchNorm its gradient. Constant
statistics (the running buffers) go through PyTorch's own kernel instead,
which measured faster on the CPU (see benchmarks/). And that kernel where
nothing but the input takes a gradient (``frozen``), keeping per-channel
tensors for backward instead of the input (:func:`normalize_constant_affine`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import reduce_dims

__all__ = ["normalize_constant_affine", "normalize_with_stats"]


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
        # F.batch_norm(..., training=False) with these statistics. (Detached: the kernel refuses
        # statistics that require grad where a tracer runs this forward with autograd on: torch.export.)
        return F.batch_norm(x, mean.detach(), var.detach(), weight, bias, False, 0.0, eps)

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
    composed: bool = False,
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
        composed: compute with plain differentiable ops instead of PyTorch's kernel and a custom
            backward: for exporters and ``torch.jit.trace`` (which record the forward's ops and would
            drop the backward) and ``torch.func`` transforms (``vmap`` has no rule for a custom
            function); the same values up to rounding, the same gradients.

    Returns:
        A tensor of the shape, dtype and memory format of ``x``.

    Example:
        >>> x = torch.randn(4, 3, 2, 2)
        >>> y = normalize_with_stats(x, torch.zeros(3), torch.full((3,), 4.0), eps=1e-5)
        >>> torch.allclose(y, x / 2)
        True
    """
    if composed:
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        return x * _channel_view(scale, x.dim()).to(x.dtype) + _channel_view(shift, x.dim()).to(x.dtype)
    return _NormalizeWithStats.apply(x, mean, var, weight, bias, eps)


class _ConstantAffine(torch.autograd.Function):
    """Normalization with running statistics whose affine takes no gradient (``frozen``): PyTorch's eval
    kernel, forward and backward (bit-identical to it, as captured code that runs the kernel itself),
    keeping only the per-channel ``weight`` and ``var`` for backward where the kernel keeps ``x`` too:
    in eval, the input gradient ``dy * weight / sqrt(var + eps)`` does not depend on ``x`` (the kernel
    gets ``dy`` in its place). As torchvision's FrozenBatchNorm2d, nothing of the activation is kept."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> Tensor:
        # (ctx in forward, no setup_context: Function.apply then skips binding the arguments with
        # inspect.signature, most of its host cost; this runs eagerly only, never under torch.func.)
        ctx.save_for_backward(weight, var)
        ctx.eps = eps
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch._C._get_cudnn_enabled())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, var = ctx.saved_tensors  # (the mean does not enter the input gradient: var stands in for it)
        grad_x = torch.ops.aten.native_batch_norm_backward(grad, grad, weight, var, var, None, None, False, ctx.eps,
                                                           [True, False, False])[0]
        return grad_x, None, None, None, None, None


def normalize_constant_affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                              eps: float) -> Tensor:
    """PyTorch's eval-mode BatchNorm of ``x`` where nothing but ``x`` takes a gradient (``frozen``):
    the kernel's output and input gradient, bit for bit (to any order), keeping only per-channel
    tensors for backward where the kernel would keep ``x`` too."""
    return _apply_constant_affine(x, mean, var, weight, bias, eps)


# The C implementation that Function.apply ends in, without its Python preamble (argument binding and
# functorch's unwrapping, which eager code outside any transform does not need): most of the host cost.
_apply_constant_affine = super(torch.autograd.Function, _ConstantAffine).apply
