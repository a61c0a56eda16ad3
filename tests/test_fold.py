"""bnctl.fold: conv+BatchNorm folding at every forward, exact against the unfolded model (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnctl
from conftest import FrozenBatchNorm2d, TimmBatchNormAct2d

EXACT = dict(rtol=1e-10, atol=1e-10)


class BasicBlock(nn.Module):
    """torchvision's ResNet block: conv-bn-relu-conv-bn, a downsample Sequential, a residual sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class Untraceable(nn.Module):
    """A forward fx cannot trace (a branch on a tensor's value) around foldable Sequentials."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), TimmBatchNormAct2d(4))

    def forward(self, x):
        x = self.stem(x)
        return self.depthwise(x) if x.sum() > 0 else -self.depthwise(x)


def resnet_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), BasicBlock(4, 6, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


def warmed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model = model.double()
    with torch.no_grad():
        model.train()
        for k in range(3):
            model(x * (k + 1) + k)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def run(model: nn.Module, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, dict]:
    """Output and the gradient of every input and parameter for a random upstream gradient."""
    model.train(training)
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype))
    grads = {"input": x.grad, **{k: p.grad for k, p in model.named_parameters()}}
    return y.detach(), grads


def assert_same(got, want, **tol):
    (y, grads), (y_ref, grads_ref) = got, want
    torch.testing.assert_close(y, y_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], **tol, msg=k)


X = torch.randn(4, 3, 8, 8, dtype=torch.float64)


def test_pairs_are_proved_from_the_graph():
    model = resnet_like()
    handle = bnctl.fold(model)
    assert handle.pairs == [("0", "1"), ("3.conv1", "3.bn1"), ("3.conv2", "3.bn2"),
                            ("3.downsample.0", "3.downsample.1")]
    assert handle.skipped == []


@pytest.mark.parametrize("preset", ["frozen", "frozen_stats", "torch", "running_update", "test_time"])
@pytest.mark.parametrize("training", [True, False])
def test_folded_equals_unfolded_in_float64(preset, training):
    ref = warmed(resnet_like(), X)
    bnctl.apply(ref, preset)
    model = copy.deepcopy(ref)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    bnctl.fold(model)
    want = run(ref, X, training)
    assert_same(run(model, X, training), want, **EXACT)
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, dict(ref.named_buffers())[k], rtol=0, atol=0)
    if preset in ("frozen", "frozen_stats"):
        assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def batch_norm_calls(monkeypatch) -> list:
    """Calls of F.batch_norm: a folded pair's BatchNorm makes none."""
    calls: list = []
    original = torch.nn.functional.batch_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", counting)
    return calls


def test_it_folds_only_when_the_layer_normalizes_with_running_statistics_and_updates_nothing(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double()
    handle = bnctl.fold(model)
    calls = batch_norm_calls(monkeypatch)
    with torch.no_grad():
        model.eval()(X)
        assert len(calls) == 0  # folded
        model.train()(X)  # torch preset in train(): batch statistics, conv then BN
        assert len(calls) == 1
        model[0](X)  # the conv alone (outside the model that proved the pair) is a plain conv
        model.eval()
        plain = model[0](X)
        handle.remove()
        torch.testing.assert_close(plain, model[0](X), rtol=0, atol=0)


def test_remove_restores_the_modules_exactly():
    model = warmed(resnet_like(), X)
    state = copy.deepcopy(model.state_dict())
    handle = bnctl.fold(model)
    assert set(model.state_dict()) == set(state)
    handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    handle.remove()  # idempotent
    with bnctl.fold(model):
        with pytest.raises(ValueError, match="already folded"):
            bnctl.fold(model)


def test_a_conv_output_used_twice_or_a_shared_batchnorm_is_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)
            self.shared = nn.BatchNorm2d(3)

        def forward(self, x):
            c = self.conv(x)
            return self.bn(c) + c + self.shared(self.other(x)) + self.shared(x)

    assert bnctl.fold(Twice()).pairs == []


def test_untraceable_models_still_get_the_pairs_their_sequentials_prove():
    model = warmed(Untraceable(), X)
    ref = copy.deepcopy(model)
    handle = bnctl.fold(model)
    assert handle.pairs == [("stem.0", "stem.1"), ("depthwise.0", "depthwise.1")]
    assert len(handle.skipped) == 1 and "not traceable by torch.fx" in handle.skipped[0]
    bnctl.apply(model, "frozen_stats")
    bnctl.apply(ref, "frozen_stats")
    assert_same(run(model, X, True), run(ref, X, True), **EXACT)  # timm's act still runs after folding


@pytest.mark.parametrize("conv_cls,bn_cls,shape", [(nn.Conv1d, nn.BatchNorm1d, (4, 3, 9)),
                                                   (nn.Conv3d, nn.BatchNorm3d, (2, 3, 4, 5, 5))])
def test_conv1d_and_conv3d(conv_cls, bn_cls, shape):
    x = torch.randn(shape, dtype=torch.float64)
    model = warmed(nn.Sequential(conv_cls(3, 6, 3, groups=3, bias=True), bn_cls(6), nn.ReLU()), x)
    ref = copy.deepcopy(model)
    assert bnctl.fold(model).pairs == [("0", "1")]
    assert_same(run(model, x, False), run(ref, x, False), **EXACT)


def test_frozen_batchnorm_folds_and_domains_are_followed():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3)).double()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(model)
    assert bnctl.fold(model).pairs == [("0", "1")]
    assert_same(run(model, X, True), run(ref, X, True), **EXACT)

    model = warmed(resnet_like(), X)
    bnctl.add_domains(model, "target")
    with torch.no_grad():
        model[1].running_mean__target.add_(1.0)
    ref = copy.deepcopy(model)
    bnctl.fold(model)
    with bnctl.domain(model, "target"), bnctl.domain(ref, "target"):
        assert_same(run(model, X, False), run(ref, X, False), **EXACT)


def test_channels_last_autocast_and_compile():
    model = warmed(resnet_like(), X).float().eval()
    ref = copy.deepcopy(model)
    bnctl.fold(model)
    x = X.float().to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(x), ref(x), rtol=5e-2, atol=5e-2)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_pair_whose_weight_outweighs_its_output_runs_unfolded(monkeypatch):
    model = warmed(nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64)), torch.randn(2, 3, 9, 9, dtype=torch.float64))
    ref = copy.deepcopy(model).eval()
    bnctl.fold(model)
    calls = batch_norm_calls(monkeypatch)
    with torch.no_grad():
        small = torch.randn(2, 3, 3, 3, dtype=torch.float64)  # output 2x64x1x1 = 128 values, weight 1728
        torch.testing.assert_close(model.eval()(small), ref(small), **EXACT)
        assert len(calls) == 2  # (the reference's and the unfolded pair's)
        large = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        torch.testing.assert_close(model(large), ref(large), **EXACT)
        assert len(calls) == 3  # the reference's only: folded


def test_folding_is_invisible_to_hooks_slices_and_checkpointing():
    model = warmed(resnet_like(), X).eval()
    ref = copy.deepcopy(model)
    bnctl.fold(model)
    with torch.no_grad():
        seen = []
        hook = model[0].register_forward_hook(lambda m, i, out: seen.append(out.clone()))
        torch.testing.assert_close(model(X), ref(X), **EXACT)
        torch.testing.assert_close(seen[0], ref[0](X), **EXACT)  # the hook sees the conv's own output
        hook.remove()
        torch.testing.assert_close(model[:2](X), ref[:2](X), **EXACT)  # a slice of the Sequential
    x = X.clone().requires_grad_(True)
    y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    y.sum().backward()
    torch.testing.assert_close(y, ref(X), **EXACT)


def test_subclasses_with_their_own_forward_and_lazy_layers_are_left_alone():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class StdConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) + 1

    model = nn.Sequential(StdConv(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), Scaled(3),
                          nn.Conv2d(3, 3, 1), nn.LazyBatchNorm2d())
    assert bnctl.fold(model).pairs == [("4", "5")]
    model.eval()(torch.randn(2, 3, 4, 4))  # the lazy layer materializes unfolded, then may fold


def test_a_pair_proved_in_only_one_mode_is_not_folded():
    class ModeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            c = self.conv(x)
            return (self.bn(c), c.mean()) if self.training else self.bn(c)

    model = ModeDependent().eval()
    assert bnctl.fold(model).pairs == [] and not model.training


def test_frozen_batchnorm_stand_ins_take_over_the_fold():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3)).double()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].running_mean.uniform_(-1, 1)
    ref = copy.deepcopy(model)
    bnctl.fold(model)
    data = [3 * torch.randn(8, 3, 4, 4, dtype=torch.float64) for _ in range(2)]
    handle = bnctl.apply(model, "frozen")  # the stand-in now pairs with the conv
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), ref(X), **EXACT)
    handle.remove()
    bnctl.recalibrate(model, data)
    bnctl.recalibrate(ref, data)
    with torch.no_grad():
        torch.testing.assert_close(model[1].running_var, ref[1].running_var, **EXACT)
        torch.testing.assert_close(model(X), ref(X), **EXACT)


def test_copies_of_a_folded_model_fold_their_own_modules():
    model = warmed(resnet_like(), X).eval()
    bnctl.fold(model)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied[0].weight.mul_(2.0)  # only the copy changes
        torch.testing.assert_close(model(X), unfolded(model)(X), **EXACT)
        torch.testing.assert_close(copied(X), unfolded(copied)(X), **EXACT)
    assert copied[0].forward.__self__.conv is copied[0] and copied[0].forward.__self__.norm is copied[1]
    with pytest.raises(ValueError, match="unfold"):
        bnctl.fold(copied)
    bnctl.unfold(copied)
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in copied.modules())


def unfolded(model: nn.Module) -> nn.Module:
    """An unfolded copy of a folded model."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        m.__dict__.pop("forward", None)
    return twin


class FailsBetween(nn.Module):
    """A conv-bn pair whose forward can raise after the conv ran (folded) and before the BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fail = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), False

    def forward(self, x):
        y = self.conv(x)
        if self.fail:
            raise RuntimeError("interrupted")
        return self.bn(y)


def test_a_forward_interrupted_between_conv_and_batchnorm_leaves_nothing_behind():
    model = warmed(FailsBetween(), X).eval()
    handle = bnctl.fold(model)
    assert handle.pairs == [("conv", "bn")]
    x = X.detach().requires_grad_()
    model.fail = True
    with pytest.raises(RuntimeError, match="interrupted"):
        model(x)
    assert model.conv.forward.__self__.folded is None  # the conv's output (and its graph) is not kept
    copied = copy.deepcopy(model)  # the conv's output (part of a graph) is not copied along
    model.fail = copied.fail = False
    for m in (model, copied):
        torch.testing.assert_close(m(X), unfolded(m)(X), **EXACT)


@pytest.mark.parametrize("preset", [None, "frozen", "frozen_stats", "torch"])
def test_eps_zero_is_decided_alike_folded_and_unfolded(preset):
    """One decision for both: a layer that normalizes with running statistics takes eps=0, as PyTorch's
    eval() does (and folds, to the same numbers); one that normalizes with batch statistics raises the
    same error, folded or not: PyTorch's for plain torch layers (``None``), else bnctl's, naming the layer."""
    ref = warmed(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), X)
    ref[1].eps = 0.0
    if preset is not None:
        bnctl.apply(ref, preset)
    model = copy.deepcopy(ref)
    handle = bnctl.fold(model)
    assert handle.pairs == [("0", "1")]
    for training in (False, True):
        if training and preset in (None, "torch"):
            errors = []
            for m in (ref, model):
                with pytest.raises(ValueError, match="eps") as info:
                    m.train()(X)
                errors.append(str(info.value))
            assert errors[0] == errors[1]
            assert preset is None or errors[0].startswith("1: expected eps > 0")
        else:
            assert_same(run(model, X, training), run(ref, X, training), **EXACT)
