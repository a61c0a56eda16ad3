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


def run(model: nn.Module, x: torch.Tensor, training: bool, fn=None) -> tuple[torch.Tensor, dict]:
    """Output and the gradient of every input and parameter for a random upstream gradient (the forward
    through ``fn``, a compiled ``model``, where given)."""
    model.train(training)
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = (fn or model)(x)
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
    assert model.conv.forward.__self__.scope.frames() == []  # the conv's output (and its graph) is not kept
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


# -- never wrong where PyTorch lets users reach in (issue 20) ---------------------------------


def folded_pair(model: nn.Module, handle: bnctl.FoldHandle, conv: str) -> bnctl.FoldPair:
    return next(p for p in handle.pairs if p[0] == conv)


@pytest.mark.parametrize("kind", ["hook", "hook_with_kwargs", "pre_hook_with_kwargs"])
def test_forward_hooks_on_the_batchnorm_see_the_conv_output(kind):
    ref = warmed(resnet_like(), X).eval()
    model = copy.deepcopy(ref)
    handle = bnctl.fold(model)
    seen: dict[str, list] = {"ref": [], "model": []}
    for key, m in (("ref", ref), ("model", model)):
        record = seen[key].append
        if kind == "hook":
            m[3].bn1.register_forward_hook(lambda mod, args, out, record=record: record((args[0], out)))
        elif kind == "hook_with_kwargs":
            m[3].bn1.register_forward_hook(lambda mod, args, kwargs, out, record=record: record((args[0], out)),
                                           with_kwargs=True)
        else:
            m[3].bn1.register_forward_pre_hook(lambda mod, args, kwargs, record=record: record((args[0], args[0])),
                                               with_kwargs=True)
    assert_same(run(model, X, False), run(ref, X, False), **EXACT)
    (got_in, got_out), (want_in, want_out) = seen["model"][0], seen["ref"][0]
    torch.testing.assert_close(got_in, want_in, **EXACT)  # the conv's output, not the folded one
    torch.testing.assert_close(got_out, want_out, **EXACT)
    pair = folded_pair(model, handle, "3.conv1")
    assert pair.folded is False and pair.reason == "a forward hook on 3.bn1 must see the output of 3.conv1"
    assert folded_pair(model, handle, "3.conv2").folded is True  # other pairs still fold


@pytest.mark.parametrize("where", ["conv", "bn", "global"])
def test_full_backward_hooks_see_the_gradients_they_would_see_unfolded(where):
    ref = warmed(resnet_like(), X).eval()
    model = copy.deepcopy(ref)
    handle = bnctl.fold(model)
    seen: dict[str, list] = {"ref": [], "model": []}

    def recorder(key):
        def hook(module, grad_input, grad_output):
            seen[key].append([g for g in (*grad_input, *grad_output) if g is not None])
        return hook

    hooks = []
    try:
        if where == "global":
            hooks.append(torch.nn.modules.module.register_module_full_backward_hook(
                lambda m, gi, go: seen["ref" if m is ref[0] else "model"].append(list(gi) + list(go))
                if m in (ref[0], model[0]) else None))
        else:
            for key, m in (("ref", ref), ("model", model)):
                hooks.append((m[0] if where == "conv" else m[1]).register_full_backward_hook(recorder(key)))
        want = run(ref, X, False)
        got = run(model, X, False)
    finally:
        for h in hooks:
            h.remove()
    assert_same(got, want, **EXACT)
    assert len(seen["model"]) == len(seen["ref"]) == 1
    for g, g_ref in zip(seen["model"][0], seen["ref"][0], strict=True):
        torch.testing.assert_close(g, g_ref, **EXACT)
    reason = folded_pair(model, handle, "0").reason
    assert reason is not None and ("global module hook" in reason if where == "global" else "backward hook" in reason)


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """timm.layers.freeze_batch_norm_2d look-alike: BatchNorm2d layers become FrozenBatchNorm2d (new objects,
    the values copied), in place in their parents."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps).to(module.weight.dtype)
        with torch.no_grad():
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(module, k))
        return frozen
    for name, child in module.named_children():
        new = freeze_batch_norm_2d(child)
        if new is not child:
            module.add_module(name, new)
    return module


def users_swap(model: nn.Module) -> nn.Module:
    """A user's own swap: every BatchNorm2d replaced by a new, equal nn.BatchNorm2d."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                twin = nn.BatchNorm2d(child.num_features).to(child.weight.dtype)
                twin.load_state_dict(child.state_dict())
                parent.add_module(name, twin.train(child.training))
    return model


@pytest.mark.parametrize("swap", ["convert_sync_batchnorm", "freeze_batch_norm_2d", "users_swap"])
def test_a_batchnorm_replaced_after_folding_is_normalized_once(swap):
    swaps = {"convert_sync_batchnorm": nn.SyncBatchNorm.convert_sync_batchnorm,
             "freeze_batch_norm_2d": freeze_batch_norm_2d, "users_swap": users_swap}
    base = warmed(resnet_like(), X).eval()
    model = copy.deepcopy(base)
    handle = bnctl.fold(model)
    model = swaps[swap](model).eval()
    ref = swaps[swap](copy.deepcopy(base)).eval()
    assert "forward" not in model[1].__dict__  # a new object, not folded
    assert_same(run(model, X, False), run(ref, X, False), **EXACT)
    reasons = handle.unfolded()
    assert len(reasons) == 4 and all("was replaced since folding" in r for r in reasons.values())
    handle.remove()
    assert_same(run(model, X, False), run(ref, X, False), **EXACT)


class Between(nn.Module):
    """conv, then a callback (none while fx traces: the graph is conv -> bn), then bn."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.between = None

    def forward(self, x):
        y = self.conv(x)
        if self.between is not None:
            self.between()
        return self.bn(y)


def test_two_threads_on_one_folded_model_keep_their_own_results():
    import threading

    model = warmed(Between(), X).eval()
    ref = copy.deepcopy(model)
    bnctl.fold(model)
    barrier = threading.Barrier(2, timeout=10)
    model.between = barrier.wait  # both threads have run the conv before either runs the BatchNorm
    inputs = [torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
              for k in range(2)]
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(k):
        try:
            with torch.no_grad():
                for _ in range(5):
                    results[k].append(model(inputs[k]))
        except BaseException as err:  # (reported by the main thread)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with torch.no_grad():
        for k in range(2):
            assert len(results[k]) == 5
            for y in results[k]:
                torch.testing.assert_close(y, ref(inputs[k]), **EXACT)


def test_threads_without_synchronization_on_a_resnet_like_model():
    import sys
    import threading

    model = warmed(resnet_like(), X).eval()
    ref = copy.deepcopy(model)
    bnctl.fold(model)
    inputs = [torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
              for k in range(4)]
    with torch.no_grad():
        want = [ref(x) for x in inputs]
    worst: list[float] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def work(k):
            with torch.no_grad():
                for _ in range(40):
                    worst.append(float((model(inputs[k]) - want[k]).abs().max()))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(worst) == 160 and max(worst) < 1e-10


def test_a_nested_call_between_conv_and_batchnorm_is_reentrant():
    model = warmed(Between(), X).eval()
    ref = copy.deepcopy(model)
    bnctl.fold(model)
    other = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    inner: list[torch.Tensor] = []

    def nested():
        model.between = None
        inner.append(model(other))  # the same scope, entered again before the outer BatchNorm runs

    model.between = nested
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), **EXACT)
        torch.testing.assert_close(inner[0], ref(other), **EXACT)
    assert model.conv.forward.__self__.scope.frames() == []


class CheckpointedNet(nn.Module):
    """timm's set_grad_checkpointing look-alike: the stem, then blocks each run under a non-reentrant
    torch.utils.checkpoint inside the model's forward (fx traces through it); a head pair checkpointed
    on its own, its conv and BatchNorm direct children of the model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(4, 6, 2), BasicBlock(6, 6))
        self.conv, self.bn = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.grad_checkpointing = True
        self.use_reentrant = False

    def head(self, x):
        return torch.relu(self.bn(self.conv(x)))

    def forward(self, x):
        x = self.stem(x)
        if self.grad_checkpointing:
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.use_reentrant)
            x = torch.utils.checkpoint.checkpoint(self.head, x, use_reentrant=self.use_reentrant)
        else:
            x = self.head(self.blocks(x))
        return x.mean((2, 3))


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("preset", ["frozen", "frozen_stats", None])
def test_activation_checkpointing_inside_the_forward_trains_folded(preset, use_reentrant):
    ref = warmed(CheckpointedNet(), X)
    if preset is not None:
        bnctl.apply(ref, preset)
    ref.use_reentrant = use_reentrant
    model = copy.deepcopy(ref)
    handle = bnctl.fold(model)
    training = preset is not None  # the torch preset folds in eval()
    x = X.clone().requires_grad_(not use_reentrant)  # (the reentrant variant needs no input gradient)
    for _ in range(2):
        assert_same(run(model, x, training), run(ref, x, training), **EXACT)
    folded = {p[0] for p in handle.pairs if p.folded}
    assert {"blocks.0.conv1", "blocks.1.conv2"} <= folded  # a block re-run by the recomputation folds alike
    head = folded_pair(model, handle, "conv")  # its scope is the model, which the recomputation does not re-run
    assert head.folded is False and ("saved-tensor hooks" in head.reason or "ran outside the model" in head.reason)


class SharedModules(nn.Module):
    """fx cannot trace it (a branch on a tensor's value); a conv, and a BatchNorm, each in two Sequentials."""

    def __init__(self):
        super().__init__()
        conv, bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.a = nn.Sequential(conv, nn.BatchNorm2d(3))
        self.b = nn.Sequential(conv, nn.BatchNorm2d(3), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(3, 3, 1), bn)
        self.d = nn.Sequential(nn.Conv2d(3, 3, 1), bn)
        self.e = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        y = self.a(x) + self.b(x) if x.sum() > 0 else self.b(x)
        return self.e(self.c(y) + self.d(y))


def test_modules_used_twice_in_an_untraceable_model():
    ref = warmed(SharedModules(), X).eval()
    model = copy.deepcopy(ref)
    handle = bnctl.fold(model)
    assert handle.pairs == [("e.0", "e.1")]
    notes = " ".join(handle.skipped)
    assert "a.0 -> a.1: not folded, a.0 is used in another place too" in notes
    assert "c.0 -> c.1: not folded, c.1 is used in another place too" in notes
    assert_same(run(model, X, False), run(ref, X, False), **EXACT)
    assert handle.pairs[0].folded is True


def test_export_domain_of_a_folded_model_is_a_plain_torch_model():
    model = warmed(resnet_like(), X).eval()
    bnctl.add_domains(model, "target")
    with torch.no_grad():
        model[1].running_mean__target.add_(1.0)
    bnctl.fold(model)
    exported = bnctl.export_domain(model, "target")
    for m in exported.modules():
        assert "forward" not in m.__dict__ and "_bnctl" not in m.__dict__, m
        assert not m._forward_hooks and not m._forward_pre_hooks, m
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m) is nn.BatchNorm2d, type(m)
    with torch.no_grad(), bnctl.domain(model, "target"):
        torch.testing.assert_close(exported(X), model(X), **EXACT)
    assert all("forward" in model[k].__dict__ for k in (0, 1))  # the model itself stays folded


def test_pairs_say_whether_they_folded_and_why_not():
    model = warmed(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), X)
    handle = bnctl.fold(model)
    (pair,) = handle.pairs
    assert pair == ("0", "1") and pair.conv == "0" and pair.bn == "1"
    assert pair.folded is None and pair.reason == "not run since folding"
    with torch.no_grad():
        model.train()(X)
        assert pair.folded is False and pair.reason == "1 normalizes with batch statistics in train()"
        assert handle.unfolded() == {("0", "1"): "1 normalizes with batch statistics in train()"}
        model.eval()(X)
        assert pair.folded is True and pair.reason is None and handle.unfolded() == {}
        model[0](X)
        assert pair.reason == "0 ran outside the model, the module whose forward proves the pair"
    bnctl.apply(model, "running_update")
    with torch.no_grad():
        model.train()(X)
    assert pair.reason == "1 updates its running statistics in train()"


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward, but the model's own parameters and
    buffers (which exist anyway): what the graph keeps alive."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def small_resnet(norm) -> nn.Module:
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)

        def forward(self, x):
            return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(), Block(16), Block(16),
                          nn.Conv2d(16, 64, 3, stride=2, padding=1, bias=False), norm(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_var.uniform_(0.5, 2)
                m.running_mean.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("setting", ["frozen", "frozen + fold", "frozen_stats + fold"])
def test_what_is_saved_for_backward_is_no_more_than_frozen_batchnorm2d(setting):
    """``frozen`` keeps per-channel constants where PyTorch's eval kernel keeps the BatchNorm input; folded,
    a learning affine recomputes ``W * s`` in backward (it keeps a few per-channel tensors more than
    FrozenBatchNorm2d's one scale: 5% at this small size). Sizes where some pairs' weights outweigh their
    output (the last conv at 4x4), so ``prefer="memory"`` matters."""
    x = torch.randn(2, 3, 8, 8)
    baseline = saved_bytes(small_resnet(FrozenBatchNorm2d).train(), x)
    model = small_resnet(nn.BatchNorm2d).train()
    before = saved_bytes(model, x)
    preset, folded = setting.split(" + ")[0], "fold" in setting
    bnctl.apply(model, preset)
    handle = bnctl.fold(model) if folded else None
    got = saved_bytes(model, x)
    assert got <= baseline * (1.05 if preset == "frozen_stats" else 1.0) and baseline < before
    if handle is not None:  # (frozen: time decides, and the block convs' weights outweigh their outputs)
        assert [p.folded for p in handle.pairs] == [True] + [preset == "frozen_stats"] * 5


def test_prefer_time_or_memory():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = small_resnet(nn.BatchNorm2d).double().train()
    bnctl.apply(model, "frozen_stats")
    ref = copy.deepcopy(model)
    for prefer in ("memory", "time"):
        twin = copy.deepcopy(model)
        handle = bnctl.fold(twin, prefer=prefer)
        assert handle.prefer == prefer
        assert_same(run(twin, x, True), run(ref, x, True), **EXACT)
        last = handle.pairs[-1]
        assert last.folded is (prefer == "memory")
        if prefer == "time":
            assert last.reason == "faster unfolded: the weight of 5 (9216 values) outweighs its output (2048 values)"
        with torch.no_grad():  # no gradient: no memory to save, time decides
            twin(x)
        assert last.folded is False
    with pytest.raises(ValueError, match=r"expected prefer to be one of \['memory', 'time'\], got 'speed'"):
        bnctl.fold(model, prefer="speed")


@pytest.mark.parametrize("conv", [
    dict(cls=nn.Conv1d, shape=(2, 4, 7), kwargs=dict(kernel_size=3, stride=2, padding=1, bias=True)),
    dict(cls=nn.Conv2d, shape=(2, 4, 5, 5), kwargs=dict(kernel_size=3, groups=2, dilation=2, padding="same")),
    dict(cls=nn.Conv2d, shape=(2, 4, 5, 5), kwargs=dict(kernel_size=2, padding="same", padding_mode="reflect")),
    dict(cls=nn.Conv2d, shape=(2, 4, 5, 5), kwargs=dict(kernel_size=3, padding=1, padding_mode="circular")),
    dict(cls=nn.Conv3d, shape=(2, 4, 3, 3, 3), kwargs=dict(kernel_size=3, padding=1, bias=False)),
], ids=["1d", "2d-groups-same", "2d-even-same-reflect", "2d-circular", "3d"])
def test_the_folded_conv_that_recomputes_its_weight_is_exact_and_passes_gradcheck(conv):
    """prefer="memory" with a learning affine folds through a function that keeps ``W`` and ``s``, not ``W * s``."""
    x = torch.randn(conv["shape"], dtype=torch.float64)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[x.dim() - 2]
    ref = warmed(nn.Sequential(conv["cls"](4, 6, **conv["kwargs"]), bn(6)), x)
    bnctl.apply(ref, "frozen_stats")
    model = copy.deepcopy(ref)
    handle = bnctl.fold(model)
    assert_same(run(model, x, True), run(ref, x, True), **EXACT)
    assert handle.pairs[0].folded is True
    fold_module = __import__("bnctl.fold", fromlist=["_FoldedConv"])
    calls = []
    original = fold_module._FoldedConv.apply
    try:
        fold_module._FoldedConv.apply = lambda *a: calls.append(1) or original(*a)
        params = (model[0].weight, model[1].weight, model[1].bias)

        def f(inp, *ps):
            return torch.func.functional_call(model, dict(zip(("0.weight", "1.weight", "1.bias"), ps)), (inp,))

        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), *params), eps=1e-6, atol=1e-5)
    finally:
        fold_module._FoldedConv.apply = original
    assert calls


def test_the_folded_conv_function_alone_passes_gradcheck():
    from bnctl.fold import _FoldedConv

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.rand(6, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    f = lambda x, w, s, b: _FoldedConv.apply(x, w, s, b, (2, 1), (1, 0), (1, 2), 2, None)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, s, b))
    assert torch.autograd.gradgradcheck(f, (x, w, s, b))  # gradient penalties through a folded model
    want = torch.nn.functional.conv2d(x, w * s.reshape(-1, 1, 1, 1), b, (2, 1), (1, 0), (1, 2), 2)
    torch.testing.assert_close(f(x, w, s, b), want, rtol=0, atol=0)


def test_a_learning_affine_folds_exactly_under_autocast_and_compile():
    model = small_resnet(nn.BatchNorm2d).train()
    bnctl.apply(model, "frozen_stats")
    ref = copy.deepcopy(model)
    handle = bnctl.fold(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(model, x, True), run(ref, x, True)
    assert all(p.folded for p in handle.pairs)
    assert_same(got, want, rtol=5e-2, atol=5e-2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_same(run(model, x, True, compiled), run(ref, x, True), rtol=1e-5, atol=1e-5)
