"""normalize_with_stats: forward against torch's kernel, gradients of every input to second order."""

import pytest
import torch

from bnctl.autograd import normalize_constant_affine, normalize_with_stats
from conftest import make_inputs


def test_forward_is_torchs_eval_kernel():
    x, rm, rv, w, b = make_inputs((4, 3, 5, 5), torch.float32)
    y = normalize_with_stats(x, rm, rv, w, b)
    assert torch.equal(y, torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5))


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1, 1), (3, 2, 2, 2)], ids=str)
def test_gradcheck_and_gradgradcheck_all_inputs(shape):
    x, rm, rv, w, b = make_inputs(shape)
    rm.requires_grad_(), rv.requires_grad_()

    def fn(*args):
        return normalize_with_stats(*args, eps=1e-3)

    assert torch.autograd.gradcheck(fn, (x, rm, rv, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, rm, rv, w, b))


def test_without_affine():
    x, rm, rv, _, _ = make_inputs((3, 2, 2))
    rm.requires_grad_(), rv.requires_grad_()
    fn = lambda *a: normalize_with_stats(*a, None, None, 1e-3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, rm, rv))
    assert torch.autograd.gradgradcheck(fn, (x, rm, rv))


def test_channels_last_and_bfloat16():
    x = torch.randn(4, 3, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    rm, rv, w, b = torch.randn(3), torch.rand(3) + 0.5, torch.rand(3), torch.randn(3)
    y = normalize_with_stats(x, rm, rv, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    xb = x.detach().bfloat16().requires_grad_()
    yb = normalize_with_stats(xb, rm, rv, w.requires_grad_(), b)
    assert yb.dtype == torch.bfloat16
    yb.backward(torch.randn_like(yb))
    assert xb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("affine", [True, False])
def test_constant_affine_is_the_eval_kernel_to_second_order(affine):
    """``frozen``'s normalization keeps per-channel tensors, not x: the eval kernel's output and input
    gradient bit for bit, gradcheck and gradgradcheck in float64 (gradient penalties through a frozen
    backbone), and only per-channel tensors saved."""
    x, rm, rv, w, b = make_inputs((4, 3, 5, 5))
    w, b = (w.detach(), b.detach()) if affine else (None, None)
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y = normalize_constant_affine(x, rm, rv, w, b, 1e-5)
    x2 = x.detach().clone().requires_grad_(True)
    want = torch.nn.functional.batch_norm(x2, rm, rv, w, b, False, 0.0, 1e-5)
    assert torch.equal(y, want)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x2, g)[0])
    assert torch.autograd.gradcheck(lambda t: normalize_constant_affine(t, rm, rv, w, b, 1e-5), (x,))
    assert torch.autograd.gradgradcheck(lambda t: normalize_constant_affine(t, rm, rv, w, b, 1e-5), (x,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        normalize_constant_affine(x, rm, rv, w, b, 1e-5)
    assert saved and max(saved) == 3
