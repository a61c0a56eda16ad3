"""The same contracts on a CUDA device (skipped without one; CI has none)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import bnctl
from conftest import MODES, RENORM_LIMITS, TOL, make_inputs, ours, reference_bn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"


def pair(**kwargs):
    ref = nn.BatchNorm2d(8, **kwargs).to(DEV)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    mine = bnctl.BatchNorm2d(8, **kwargs).to(DEV)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@pytest.mark.parametrize("momentum", [0.1, 0.0, None])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_torch_preset_bit_identical_cuda(momentum, fmt):
    ref, mine = pair(momentum=momentum)
    for training in (True, True, False, True):
        ref.train(training), mine.train(training)
        x = (torch.randn(16, 8, 7, 7, device=DEV) * 2 + 1).to(memory_format=fmt)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), mine(xo)
        g = torch.randn_like(yr)
        yr.backward(g), yo.backward(g)
        assert torch.equal(yr, yo) and torch.equal(xr.grad, xo.grad)
        assert torch.equal(ref.weight.grad, mine.weight.grad)
        for (k, a), b in zip(ref.state_dict().items(), mine.state_dict().values()):
            assert torch.equal(a, b), k


def test_torch_preset_bit_identical_cuda_autocast_fp16():
    ref, mine = pair()
    conv = nn.Conv2d(8, 8, 1).to(DEV)
    for training in (True, False):
        ref.train(training), mine.train(training)
        x = torch.randn(16, 8, 7, 7, device=DEV)
        with torch.autocast("cuda", dtype=torch.float16):
            h = conv(x)
            yr, yo = ref(h), mine(h)
        assert yr.dtype == yo.dtype and torch.equal(yr, yo)
        assert torch.equal(ref.running_var, mine.running_var)


@pytest.mark.parametrize("preset", ["torch", "running_update", "renorm", "recalibrate"])
def test_non_finite_guard_on_device_without_sync(preset):
    _, bn = pair()
    bn(torch.randn(16, 8, 4, 4, device=DEV))
    bnctl.apply(bn, preset)
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(16, 8, 4, 4, device=DEV)
    x[0, 3, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no host-side warning on the device path
        bn.train()(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.skipped_updates == 1


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_modes_match_reference_cuda_float64(mode):
    x, rm, rv, w, b = (t.to(DEV).detach().requires_grad_(t.requires_grad) if t is not None else None
                       for t in make_inputs((4, 3, 5, 5)))
    y = ours(x, rm, rv, w, b, mode)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    ref_y = reference_bn(x, rm, rv, w, b, mode[0], rmax=RENORM_LIMITS[0], dmax=RENORM_LIMITS[1])
    want = torch.autograd.grad(ref_y, (x, w, b), g)
    torch.testing.assert_close(y, ref_y, **TOL[torch.float64])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


def test_gradcheck_blend_cuda():
    x, rm, rv, w, b = (t.to(DEV).detach().requires_grad_(t.requires_grad) for t in make_inputs((2, 3, 1, 1)))
    assert torch.autograd.gradcheck(lambda *a: ours(*a[:1], rm, rv, *a[1:], (0.4, "ema")), (x, w, b))


def test_accumulate_recalibrate_domains_and_report_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(DEV).train()
    ref = copy.deepcopy(model)
    x = torch.randn(24, 2, 6, 6, device=DEV)
    with torch.no_grad():
        ref(x)
        with bnctl.accumulate(model):
            for micro in x.chunk(3):
                model(micro)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    assert int(model[1].num_batches_tracked) == 1
    bnctl.add_domains(model, ["target"])
    before = copy.deepcopy(model.state_dict())
    bnctl.recalibrate(model.eval(), [x[:12] + 1, x[12:] + 1], domain="target")
    h = model[0](x + 1)
    torch.testing.assert_close(model[1].running_mean__target, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    for k, v in model.state_dict().items():
        if not k.endswith("__target"):
            assert torch.equal(v, before[k]), k
    r = bnctl.report(model, x)
    assert r.layers[0].domains == ["default", "target"] and r.layers[0].mean_shift is not None


@pytest.mark.parametrize("preset", ["torch", "running_update", "renorm", "frozen", "frozen_stats", "test_time",
                                    "batch_no_update"])
def test_training_step_waits_for_nothing(preset):
    """No forward or backward under any preset synchronizes with the device (CUDA's sync debug mode
    raises at a synchronizing call)."""
    _, bn = pair()
    bnctl.apply(bn, preset)
    x = torch.randn(16, 8, 4, 4, device=DEV, requires_grad=True)
    g = torch.randn_like(x)
    bn.train()(x).backward(g)  # first use: the layer's counters are created
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            bn(x).backward(g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if preset in ("torch", "running_update", "renorm"):
        assert int(bn.num_batches_tracked) == 4 and bn.skipped_updates == 0
