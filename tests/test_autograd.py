"""Gradients of every mode: gradcheck in float64 and autograd of a plain reference."""

import pytest
import torch

import bnctl
from bnctl import Mode
from bnctl.autograd import normalize_with_stats
from bnctl.functional import batch_norm
from conftest import TOL, reference_bn

SHAPES = [(2, 3), (2, 3, 1, 1), (2, 3, 1), (3, 2, 2, 3), (2, 2, 1, 2, 2)]
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
    c = shape[1]
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).requires_grad_()
    rm = torch.randn(c, dtype=dtype) * 0.5
    rv = torch.rand(c, dtype=dtype) + 0.5
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=dtype).requires_grad_() if affine else None
    return x, rm, rv, w, b


def ours(x, rm, rv, w, b, mode, **kwargs):
    """bnctl on fresh copies of the buffers, so repeated calls see the same function."""
    acc = bnctl.Accumulator.empty(x.shape[1], x.device) if mode[1] == "cumulative" else None
    return batch_norm(
        x, rm.clone(), rv.clone(), w, b, mode=Mode(*mode), accumulator=acc,
        num_batches_tracked=torch.tensor(0, device=x.device), renorm=(1.5, 0.5), **kwargs
    )


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(mode, shape, affine):
    x, rm, rv, w, b = make_inputs(shape, affine=affine)
    if mode[0] == "renorm":
        # r and d are constants in backward by definition (a stop-gradient), so the numerical
        # Jacobian only agrees where both are clipped: far-off running statistics ensure it.
        rm, rv = rm + 10.0, rv + 100.0
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*args):
        x_, *rest = args
        w_, b_ = (rest + [None, None])[:2] if affine else (None, None)
        return ours(x_, rm, rv, w_, b_, mode)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (4, 3, 5, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_autograd_random_upstream(mode, shape, dtype):
    x, rm, rv, w, b = make_inputs(shape, dtype)
    y = ours(x, rm, rv, w, b, mode)
    g = torch.randn_like(y)  # never .sum(): it hides BatchNorm gradient errors
    got = torch.autograd.grad(y, (x, w, b), g)
    ref_y = reference_bn(x, rm, rv, w, b, mode[0], rmax=1.5, dmax=0.5)
    want = torch.autograd.grad(ref_y, (x, w, b), g)
    torch.testing.assert_close(y, ref_y, **TOL[dtype])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL[dtype])


def test_normalize_with_stats_gradients_for_statistics():
    x, rm, rv, w, b = make_inputs((3, 2, 2, 2))
    rm.requires_grad_(), rv.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: normalize_with_stats(*a, eps=1e-3), (x, rm, rv, w, b)
    )


def test_normalize_with_stats_channels_last_and_bfloat16():
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


def test_running_forward_equals_torch_eval_bitwise():
    x, rm, rv, w, b = make_inputs((4, 3, 5, 5), torch.float32)
    y = ours(x, rm, rv, w, b, ("running", "none"))
    assert torch.equal(y, torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5))


def test_the_gradient_test_can_fail(monkeypatch):
    """Inject a sign error into the backward: the reference comparison must catch it."""
    from bnctl import autograd as ag

    original = ag._NormalizeWithStats.backward

    def wrong(ctx, grad_out):
        grads = list(original.__wrapped__(ctx, grad_out))  # unwrap once_differentiable
        grads[3] = -grads[3]
        return tuple(grads)

    monkeypatch.setattr(ag._NormalizeWithStats, "backward", staticmethod(wrong))
    with pytest.raises(AssertionError):
        test_matches_reference_autograd_random_upstream((0.3, "none"), (4, 3, 5, 5), torch.float64)
