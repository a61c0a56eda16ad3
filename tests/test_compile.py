"""bnctl layers under graph capture: torch.compile, torch.export, torch.jit.trace and torch.func.

Every check compares against the same preset run eagerly on a copy of the same model: outputs,
gradients, parameters and buffers (running statistics and ``num_batches_tracked``). The
``aot_eager`` backend and ``jit.trace`` run the same ATen ops as eager, so those comparisons are
exact; so are outputs of exported modules and gradients under ``torch.func``, whose running
statistics may differ in the last bit (see ``ULPS``). Inductor fuses kernels, so it is compared in
float64 with tight tolerances.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call, grad, stack_module_state, vmap

import bnctl

PRESETS = sorted(bnctl.PRESETS)
UPDATING = ("torch", "running_update", "renorm")  # presets whose train() forward updates running statistics
BLEND = bnctl.Policy(0.4, "ema", 0.6, "none", learn_affine=True, name="blend")  # no preset blends
GHOST = pytest.param(bnctl.Policy(ghost=3, name="ghost"), id="ghost")  # batches of 8: slices of 3, 3 and 2
BN_AFFINE = ("1.weight", "1.bias", "4.weight", "4.bias")
# A few float32 ulps: where bnctl computes batch statistics with other ops than eager's fused kernel
# (var_mean while exporting, the EMA formula under torch.func), running statistics may differ in the last bit.
ULPS = dict(rtol=1e-6, atol=1e-7)


# -- models, data and comparisons -------------------------------------------------------------


def make_net(momentum: float = 0.1, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Conv-BN-ReLU-Conv-BN-ReLU-pool-Linear on 3-channel 8x8 inputs, 4 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).to(dtype)


def batch(seed: int, n: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g) * 2 + 1).to(dtype)


def targets(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))


def warmed(momentum: float = 0.1, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A fresh model whose running statistics were updated by a few batches (no "never updated" warning)."""
    model = make_net(momentum, dtype).train()
    with torch.no_grad():
        for seed in range(100, 103):
            model(batch(seed, dtype=dtype))
    return model


def copies(preset: str, n: int = 2, **kwargs) -> list[nn.Sequential]:
    """``n`` identical warmed models, each put under ``preset``."""
    base = warmed(**kwargs)
    models = [copy.deepcopy(base) for _ in range(n)]
    for m in models:
        bnctl.apply(m, preset)
    return models


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def assert_close(got: dict, want: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


def eager_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's .grad, zeros where autograd left none."""
    return {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}


@pytest.fixture
def dynamo():
    """A fresh dynamo cache and fresh counters."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# -- torch.compile ----------------------------------------------------------------------------


def sgd_then_eval(model: nn.Module, fn) -> torch.Tensor:
    """Three SGD steps in train() through ``fn``, then one eval() forward."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for seed in range(3):
        opt.zero_grad()
        F.cross_entropy(fn(batch(seed)), targets(seed)).backward()
        opt.step()
    model.eval()
    return fn(batch(0))


@pytest.mark.parametrize("preset", [*PRESETS, GHOST])
def test_compile_aot_eager_matches_eager_exactly(preset, dynamo):
    eager, comp = copies(preset)
    want = sgd_then_eval(eager, eager)
    got = sgd_then_eval(comp, torch.compile(comp, backend="aot_eager", fullgraph=True))
    assert torch.equal(got, want)
    assert_equal(dict(comp.named_parameters()), dict(eager.named_parameters()))
    assert_equal(buffers(comp), buffers(eager))


@pytest.mark.parametrize("preset", [*PRESETS, GHOST])
def test_compile_inductor_gradients_float64(preset, dynamo):
    # momentum 0.5: a backward that saw the updated running statistics would be far off.
    eager, comp = copies(preset, momentum=0.5, dtype=torch.float64)
    x, t = batch(0, dtype=torch.float64), targets(0)
    for model, fn in ((eager, eager), (comp, torch.compile(comp, backend="inductor", fullgraph=True))):
        model.train()
        F.cross_entropy(fn(x), t).backward()
    assert_close(eager_grads(comp), eager_grads(eager), atol=1e-10)
    assert_close(buffers(comp), buffers(eager), atol=1e-12)


def graphs_for_train_eval_loop(model: nn.Module) -> int:
    """Unique dynamo graphs for six train (forward+backward) / eval (forward) rounds."""
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(model, backend="aot_eager")
    x = batch(0)
    for _ in range(6):
        model.train()
        fn(x).sum().backward()
        model.eval()
        fn(x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("preset", PRESETS)
def test_compile_train_eval_toggle_no_recompile_no_graph_break(preset, dynamo):
    plain = warmed()
    model = copies(preset, n=1)[0]
    if preset == "recalibrate":
        # The cumulative accumulator is created by the first train() forward, a one-off recompile.
        model.train()(batch(0))
    want = graphs_for_train_eval_loop(plain)
    assert graphs_for_train_eval_loop(model) == want


# -- non-finite batches under compile, export and trace ---------------------------------------


def capture(way: str, model: nn.Module, x: torch.Tensor):
    """``(fn, holder)``: the captured forward and the module whose buffers it updates."""
    if way == "compile":
        return torch.compile(model, backend="aot_eager", fullgraph=True), model
    if way == "export":
        module = torch.export.export(model, (x,)).module()
        return module, module
    if way == "trace":
        saved = buffers(model)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        with torch.no_grad():  # tracing ran one forward: put the statistics back
            for k, v in model.named_buffers():
                v.copy_(saved[k])
        return traced, traced
    raise ValueError(way)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("way", ["compile", "export", "trace"])
@pytest.mark.parametrize("preset", UPDATING)
def test_nonfinite_batch_skipped_when_captured(preset, way, dynamo):
    eager, model = copies(preset)
    eager.train()
    model.train()
    good = batch(1)
    bad = batch(0)
    bad[0, 0, 0, 0] = float("nan")
    fn, holder = capture(way, model, good)
    assert_equal(buffers(holder), buffers(eager))
    # Traced calls run without autograd here: with it, see test_trace_train_keeps_buffers_out_of_autograd.
    grad_mode = torch.no_grad() if way == "trace" else torch.enable_grad()

    before = buffers(holder)
    with grad_mode:
        fn(bad)
    eager(bad)
    assert_equal(buffers(holder), before)
    assert_equal(buffers(eager), before)

    with grad_mode:
        got = fn(good)
    assert torch.equal(got, eager(good))
    assert_equal(buffers(holder), buffers(eager))
    assert not torch.equal(buffers(holder)["1.running_mean"], before["1.running_mean"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("preset", [*UPDATING, "recalibrate"])
def test_nonfinite_batch_skipped_under_inductor(preset, bad, dynamo):
    """The guard survives inductor's rewrites (an arithmetic finiteness test such as ``x * 0 == 0`` is
    constant-folded to True there: a NaN batch would be written). Float64, so the numbers compare tightly."""
    eager, model = copies(preset, dtype=torch.float64)
    fn = torch.compile(model, backend="inductor", fullgraph=True)
    eager.train(), model.train()
    good = [batch(seed, dtype=torch.float64) for seed in (1, 2)]
    poisoned = batch(0, dtype=torch.float64)
    poisoned[0, 0, 0, 0] = bad
    fn(good[0]), eager(good[0])
    before, before_eager = buffers(model), buffers(eager)  # (equal up to inductor's rounding)
    fn(poisoned)
    eager(poisoned)
    assert_equal(buffers(model), before)  # nothing written, num_batches_tracked included
    assert_equal(buffers(eager), before_eager)
    torch.testing.assert_close(fn(good[1]), eager(good[1]), rtol=1e-12, atol=1e-12)
    assert_close(buffers(model), buffers(eager), rtol=1e-12, atol=1e-12)
    assert not torch.equal(buffers(model)["1.running_mean"], before["1.running_mean"])  # a good batch writes


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("preset", UPDATING)
def test_trace_train_keeps_buffers_out_of_autograd(preset):
    eager, model = copies(preset)
    eager.train()
    model.train()
    x = batch(0)
    traced, _ = capture("trace", model, x)
    for _ in range(2):
        assert torch.equal(traced(x), eager(x))
        assert not any(b.requires_grad for b in model.buffers())
        assert_equal(buffers(model), buffers(eager))


# -- torch.export ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("preset", [*(p for p in PRESETS if p != "recalibrate"), GHOST])
def test_export_matches_eager(preset, mode):
    eager, model = copies(preset)
    getattr(eager, mode)()
    getattr(model, mode)()
    exported = torch.export.export(model, (batch(0),)).module()
    for seed in range(3):  # several batches: whatever the graph keeps across calls must be in its buffers
        x = batch(seed)
        assert torch.equal(exported(x), eager(x))
        assert_close(buffers(exported), buffers(eager), **ULPS)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("way", ["export", "trace"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_cumulative_average_is_not_captured(way, mode):
    """Its running sums live outside the buffers: a traced or exported graph would keep them as constants
    and average only its last batch (it did), so capturing one raises, naming the layer and the fix."""
    (model,) = copies("recalibrate", n=1)
    getattr(model, mode)()
    with pytest.raises(RuntimeError, match=r"^1: a cumulative average keeps its running sums outside"):
        if way == "export":
            torch.export.export(model, (batch(0),))
        else:
            torch.jit.trace(model, (batch(0),), check_trace=False)


# -- torch.func ------------------------------------------------------------------------------


def split_state(model: nn.Module):
    """Fresh (params, buffers) dicts for functional_call."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}, buffers(model)


@pytest.mark.parametrize("preset", PRESETS)
def test_functional_call_train_updates_passed_buffers(preset):
    eager, model = copies(preset)
    eager.train()
    model.train()
    params, bufs = split_state(model)
    x = batch(0)
    y = functional_call(model, (params, bufs), (x,))
    assert torch.equal(y, eager(x))
    assert_equal(bufs, buffers(eager))


def func_grads(model: nn.Module, x: torch.Tensor, t: torch.Tensor):
    """torch.func.grad of the loss w.r.t. every parameter, buffers passed as an argument."""
    params, bufs = split_state(model)

    def loss(p, b):
        return F.cross_entropy(functional_call(model, (p, b), (x,)), t)

    return grad(loss)(params, bufs), bufs


@pytest.mark.parametrize("preset", PRESETS)
def test_func_grad_matches_eager_backward(preset):
    eager, model = copies(preset)
    eager.train()
    model.train()
    x, t = batch(0), targets(0)
    grads, bufs = func_grads(model, x, t)
    F.cross_entropy(eager(x), t).backward()
    assert_equal(grads, eager_grads(eager))
    assert_close(bufs, buffers(eager), **ULPS)


def test_func_grad_frozen_affine_is_zero_even_if_requires_grad():
    model = copies("frozen", n=1)[0].train()
    for name in BN_AFFINE:
        model.get_parameter(name).requires_grad_(True)
    grads, _ = func_grads(model, batch(0), targets(0))
    for name in BN_AFFINE:
        assert torch.equal(grads[name], torch.zeros_like(grads[name])), name
    assert grads["0.weight"].abs().sum() > 0


def vmapped_forward(models: list[nn.Module], x: torch.Tensor):
    """Run ``models`` stacked under vmap; returns (outputs, stacked buffers)."""
    params, bufs = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")

    def f(p, b, xx):
        return functional_call(skeleton, (p, b), (xx,))

    return vmap(f, in_dims=(0, 0, None))(params, bufs, x), bufs


def three_models(preset: str) -> list[nn.Module]:
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models += copies(preset, n=1)
    return [m.train() for m in models]


@pytest.mark.parametrize("preset", [*[p for p in PRESETS if p != "recalibrate"], BLEND], ids=str)
def test_vmap_over_stacked_models_matches_each_model(preset):
    models = three_models(preset)
    refs = copy.deepcopy(models)
    x = batch(0)
    y, bufs = vmapped_forward(models, x)
    torch.testing.assert_close(y, torch.stack([r(x) for r in refs]), rtol=0, atol=1e-6)
    for i, ref in enumerate(refs):
        assert_close({k: v[i] for k, v in bufs.items()}, buffers(ref), atol=1e-6)


def test_vmap_recalibrate_raises():
    with pytest.raises(RuntimeError, match="vmap"):
        vmapped_forward(three_models("recalibrate"), batch(0))


# -- frozen means frozen (eager) ---------------------------------------------------------------


def test_frozen_affine_gets_no_grad_after_requires_grad():
    model = copies("frozen", n=1)[0].train()
    for name in BN_AFFINE:
        model.get_parameter(name).requires_grad_(True)
    F.cross_entropy(model(batch(0)), targets(0)).backward()
    for name in BN_AFFINE:
        g = model.get_parameter(name).grad
        assert g is None or torch.equal(g, torch.zeros_like(g)), name
    for name in ("0.weight", "3.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


# -- blends and float64 under capture (issue 21) ------------------------------------------------

@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("preset", ["running_update", "renorm", BLEND], ids=str)
def test_trace_float64_updates_exactly_as_eager(preset):
    """A traced size is a tensor: n / (n - 1) once became a float32 factor (running_var off by 1e-9).
    (A traced blend normalizes with composed ops, equal up to rounding: see the export test below.)"""
    tol = dict(rtol=1e-13, atol=1e-13) if preset is BLEND else dict(rtol=0, atol=0)
    eager, model = copies(preset, dtype=torch.float64)
    eager.train(), model.train()
    saved = buffers(model)
    traced = torch.jit.trace(model, (batch(0, dtype=torch.float64),), check_trace=False)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(saved[k])
        for seed in range(3):
            x = batch(seed, dtype=torch.float64)
            torch.testing.assert_close(traced(x), eager(x), **tol)
    assert_close(buffers(model), buffers(eager), **tol)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_export_of_a_blend_whose_affine_learns_gives_eager_outputs_and_gradients(mode):
    eager, model = copies(BLEND, dtype=torch.float64)
    getattr(eager, mode)(), getattr(model, mode)()
    x = batch(0, dtype=torch.float64)
    exported = torch.export.export(model, (x,)).module()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    g = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_eager, y_exported = eager(xs[0]), exported(xs[1])
    torch.testing.assert_close(y_exported, y_eager, rtol=1e-12, atol=1e-12)
    y_eager.backward(g), y_exported.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-10, atol=1e-12)
    want = eager_grads(eager)
    for k, p in exported.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-10, atol=1e-12, msg=k)
    assert_close(buffers(exported), buffers(eager), rtol=1e-13, atol=1e-13)

