"""normalize_with_stats: forward against torch's kernel, gradients of every input to second order."""

import pytest
import torch

from bnctl.autograd import normalize_with_stats
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
