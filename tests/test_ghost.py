"""Ghost batches (``Policy.ghost``): each slice of k samples normalized with its own batch statistics, the
running statistics updated once per forward from the whole batch's exact statistics.

References: torch's own BatchNorm run slice by slice and concatenated (outputs, gradients), and float64
statistics of the whole batch (running statistics)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnctl
from bnctl.policy import Step

TORCH_GHOST = dataclasses.replace(bnctl.PRESETS["torch"], ghost=4)

SHAPES = {  # (N, C, *) with N not a multiple of 4: a smaller last slice
    1: [(10, 3), (10, 3, 5)],
    2: [(10, 3, 4, 4)],
    3: [(10, 3, 2, 3, 3)],
}
LAYERS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def reference(x, weight, bias, size, eps=1e-5):
    """torch's BatchNorm on each slice of ``size`` samples, concatenated."""
    return torch.cat([F.batch_norm(s, None, None, weight, bias, True, 0.0, eps) for s in x.split(size)])


def whole_batch(x):
    """Mean and unbiased variance of the whole batch per channel, in float64."""
    dims = [0, *range(2, x.dim())]
    x = x.double()
    return x.mean(dims), x.var(dims, unbiased=True)


def ghost_layer(dims, channels=3, policy=TORCH_GHOST, dtype=torch.float64, **kwargs):
    bn = LAYERS[dims](channels, **kwargs).to(dtype)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bnctl.apply(bn, policy)
    return bn


@pytest.mark.parametrize("shape", [s for shapes in SHAPES.values() for s in shapes], ids=str)
def test_each_slice_is_normalized_with_its_own_statistics_and_the_update_is_the_whole_batchs(shape):
    dims = max(len(shape) - 2, 1)
    bn = ghost_layer(dims).train()
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    out = bn(x)
    torch.testing.assert_close(out, reference(x, bn.weight, bn.bias, 4), rtol=0, atol=1e-12)
    mean, var = whole_batch(x)
    torch.testing.assert_close(bn.running_mean, 0.9 * before_mean + 0.1 * mean, rtol=0, atol=1e-13)
    torch.testing.assert_close(bn.running_var, 0.9 * before_var + 0.1 * var, rtol=0, atol=1e-13)
    assert int(bn.num_batches_tracked) == 1  # one update per forward


def test_float32_outputs_are_torchs_slice_by_slice_bit_for_bit():
    bn = ghost_layer(2, channels=8, dtype=torch.float32).train()
    x = torch.randn(13, 8, 5, 5)
    assert torch.equal(bn(x), reference(x, bn.weight, bn.bias, 4))


def test_running_statistics_of_float32_inputs_are_exact_to_float32_rounding():
    bn = ghost_layer(2, channels=8, dtype=torch.float32, momentum=1.0).train()
    x = torch.randn(64, 8, 6, 6) * 3 + 2
    bn(x)
    mean, var = whole_batch(x)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("n", [10, 12, 3])
def test_gradients_are_torchs_slice_by_slice(n):
    """gradcheck in float64 (random upstream gradients), and the gradients equal the slice-by-slice
    reference's for input, weight and bias."""
    bn = ghost_layer(2).train()
    x = torch.randn(n, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    with bnctl.no_update(bn):
        assert torch.autograd.gradcheck(bn, (x,))
    upstream = torch.randn(n, 3, 3, 3, dtype=torch.float64)
    ours = torch.autograd.grad((bn(x) * upstream).sum(), (x, bn.weight, bn.bias))
    w, b = bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_()
    want = torch.autograd.grad((reference(x, w, b, 4) * upstream).sum(), (x, w, b))
    for got, expected in zip(ours, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_gradcheck_through_weight_and_bias():
    x = torch.randn(9, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    step = Step("batch", "none", ghost=4)
    assert torch.autograd.gradcheck(lambda x, w, b: bnctl.batch_norm(x, None, None, w, b, mode=step), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: bnctl.batch_norm(x, None, None, w, b, mode=step), (x, w, b))


def test_eval_uses_the_running_statistics_as_torch_does():
    bn = ghost_layer(2).eval()
    plain = nn.BatchNorm2d(3).double().eval()
    plain.load_state_dict(bn.state_dict())
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(bn(x), plain(x))


def test_a_batch_no_larger_than_the_ghost_size_is_plain_batchnorm():
    bn = ghost_layer(2, policy=dataclasses.replace(TORCH_GHOST, ghost=16)).train()
    plain = nn.BatchNorm2d(3).double().train()
    plain.load_state_dict(bn.state_dict())
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(bn(x), plain(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(dict(bn.named_buffers()), dict(plain.named_buffers()), rtol=0, atol=1e-13)


def test_cumulative_update_and_momentum_none_pool_whole_batches():
    bn = ghost_layer(2, policy=dataclasses.replace(bnctl.PRESETS["recalibrate"], ghost=3)).train()
    xs = [torch.randn(7, 3, 2, 2, dtype=torch.float64) + i for i in range(3)]
    for x in xs:
        bn(x)
    everything = torch.cat(xs)
    mean, var = whole_batch(everything)
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == 3


def test_accumulate_pools_the_whole_batches_statistics():
    bn = ghost_layer(2, momentum=0.5).train()
    want = ghost_layer(2, momentum=0.5, policy="torch").train()
    want.load_state_dict(bn.state_dict())
    xs = [torch.randn(6, 3, 2, 2, dtype=torch.float64) for _ in range(3)]
    with bnctl.accumulate(bn):
        for x in xs:
            bn(x)
    want(torch.cat(xs))  # one update from all the samples: what accumulate promises
    torch.testing.assert_close(dict(bn.named_buffers()), dict(want.named_buffers()), rtol=0, atol=1e-12)


def test_no_update_policies_and_scopes_write_nothing():
    for policy in (dataclasses.replace(bnctl.PRESETS["batch_no_update"], ghost=4), TORCH_GHOST):
        bn = ghost_layer(2, policy=policy).train()
        before = {k: v.clone() for k, v in bn.named_buffers()}
        x = torch.randn(10, 3, 2, 2, dtype=torch.float64)
        if policy is TORCH_GHOST:
            with bnctl.no_update(bn):
                out = bn(x)
        else:
            out = bn(x)
        torch.testing.assert_close(out, reference(x, bn.weight, bn.bias, 4), rtol=0, atol=1e-12)
        for k, v in bn.named_buffers():
            assert torch.equal(v, before[k]), k


def test_frozen_affine_gets_no_gradient():
    bn = ghost_layer(2, policy=dataclasses.replace(TORCH_GHOST, learn_affine=False)).train()
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    bn(x).sum().backward()
    assert bn.weight.grad is None and x.grad is not None


def test_a_domain_gets_the_update_and_the_others_are_untouched():
    bn = ghost_layer(2)
    bnctl.add_domains(bn, "target")
    default = {k: v.clone() for k, v in bn.named_buffers() if "__" not in k}
    with bnctl.domain(bn, "target"):
        bn.train()(torch.randn(10, 3, 2, 2, dtype=torch.float64))
    assert int(bn.num_batches_tracked__target) == 1
    for k, v in default.items():
        assert torch.equal(getattr(bn, k), v), k


def test_channels_last_input_keeps_its_memory_format():
    bn = ghost_layer(2, channels=8, dtype=torch.float32).train()
    x = torch.randn(10, 8, 4, 4).to(memory_format=torch.channels_last)
    out = bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference(x.contiguous(), bn.weight, bn.bias, 4), rtol=1e-6, atol=1e-6)


def test_half_inputs_with_float32_buffers():
    """Statistics of bfloat16 inputs are reduced in float32 by the kernel, into float32 buffers."""
    bn = ghost_layer(2, channels=8, dtype=torch.float32).train()
    before_mean, before_var = bn.running_mean.double(), bn.running_var.double()
    x = torch.randn(10, 8, 4, 4).bfloat16()
    out = bn(x)
    assert out.dtype is torch.bfloat16
    torch.testing.assert_close(out, reference(x, bn.weight, bn.bias, 4))
    mean, var = whole_batch(x)
    torch.testing.assert_close(bn.running_mean.double(), 0.9 * before_mean + 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.9 * before_var + 0.1 * var, rtol=1e-5, atol=1e-6)


# -- the one-value rule and bad policies --------------------------------------------------------


def test_a_last_slice_of_one_value_per_channel_raises_naming_the_layer_and_the_ghost_size():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    bnctl.apply(model, TORCH_GHOST)
    before = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(ValueError, match=r"^1: expected more than 1 value per channel.*last ghost batch of 1 of 9"):
        model.train()(torch.randn(9, 4))
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k


def test_with_fallback_such_a_batch_is_normalized_with_the_running_statistics():
    bn = ghost_layer(1, policy=dataclasses.replace(TORCH_GHOST, fallback=True)).train()
    before = {k: v.clone() for k, v in bn.named_buffers()}
    x = torch.randn(9, 3, dtype=torch.float64)
    out = bn(x)
    want = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-5)
    assert torch.equal(out, want)
    for k, v in bn.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("ghost", [0, -2, True, 2.0, "32"])
def test_ghost_must_be_a_positive_int(ghost):
    with pytest.raises(ValueError, match="Policy.ghost: expected a virtual batch size"):
        bnctl.Policy(ghost=ghost)


@pytest.mark.parametrize("preset", ["frozen", "frozen_stats", "running_update", "renorm"])
def test_ghost_needs_batch_statistics_in_train(preset):
    with pytest.raises(ValueError, match="train_normalize must be 'batch'"):
        dataclasses.replace(bnctl.PRESETS[preset], ghost=8)
    with pytest.raises(ValueError, match="train_normalize must be 'batch'"):
        bnctl.Policy(0.5, ghost=8)


def test_ghost_does_not_combine_with_sync():
    with pytest.raises(ValueError, match="sync=True would replace"):
        bnctl.Policy(ghost=8, sync=True)


def test_report_shows_ghost_batches():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    bnctl.apply(model, TORCH_GHOST)
    row = bnctl.report(model).layers[0]
    assert (row.policy, row.train, row.eval) == ("torch(ghost=4)", "ghost(4)/ema", "running/none")


def test_functional_batch_norm_takes_a_ghost_step():
    x = torch.randn(10, 3, 4, dtype=torch.float64)
    rm, rv, count = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
    out = bnctl.batch_norm(x, rm, rv, mode=Step("batch", "ema", momentum=1.0, ghost=4), num_batches_tracked=count)
    torch.testing.assert_close(out, reference(x, None, None, 4), rtol=0, atol=1e-12)
    mean, var = whole_batch(x)
    torch.testing.assert_close((rm, rv), (mean, var), rtol=0, atol=1e-13)
    assert int(count) == 1


def test_a_ghost_model_trains_like_slicing_by_hand():
    """A small CNN, SGD steps: parameters and running statistics equal those of the same model whose BatchNorm
    layers are replaced by slice-by-slice torch BatchNorm (float64)."""
    torch.manual_seed(0)

    class Sliced(nn.BatchNorm2d):
        def forward(self, x):  # torch's BatchNorm per slice; running statistics from the whole batch
            mean, var = whole_batch(x)
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
            return reference(x, self.weight, self.bias, 4, self.eps)

    def net(bn):
        return nn.Sequential(nn.Conv2d(3, 6, 3), bn(6), nn.ReLU(), nn.Conv2d(6, 6, 3), bn(6), nn.Flatten(),
                             nn.LazyLinear(2)).double()

    ours = net(nn.BatchNorm2d)
    ours(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    by_hand = net(Sliced)
    by_hand(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    by_hand.load_state_dict(ours.state_dict())
    bnctl.apply(ours, TORCH_GHOST)
    for model in (ours, by_hand):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(11, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 2, (11,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model.train()(x), y).backward()
            opt.step()
    torch.testing.assert_close(ours.state_dict(), by_hand.state_dict(), rtol=0, atol=1e-10)
