"""bnctl.Schedule in a plain loop, and the Lightning callback driven by a look-alike trainer (no Lightning needed):
policies switch at their epoch or step, survive the loop's model.train()/model.eval(), and leave nothing behind."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnctl
from conftest import block_imports


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                          nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # statistics that are not the initial 0 and 1
        model.train()(torch.randn(32, 6) * 2 + 1)
    return model


def batches(epoch: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(epoch)
    return [(torch.randn(8, 6, generator=g) * 2 + 1, torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def affine(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith(("1.", "4."))}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def trainer_loop(model: nn.Module, epochs: int, on_epoch_start, on_step=lambda step: None) -> list[dict]:
    """What a trainer does: model.train() at each epoch, SGD steps, then a validation pass in eval() and back to
    train(). Returns the statistics and affine values at the end of each epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen, step = [], 0
    for epoch in range(epochs):
        on_epoch_start(epoch)
        model.train()
        for x, y in batches(epoch):
            on_step(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            model(batches(100)[0][0])
        model.train()
        seen.append({"stats": statistics(model), "affine": affine(model)})
    return seen


def test_warm_up_then_frozen_statistics_in_a_plain_loop():
    model = make_model()
    start = statistics(model)
    schedule = bnctl.Schedule({0: "torch", 2: "frozen_stats"}, model=model)
    ends = trainer_loop(model, 5, schedule.step)
    assert not same(ends[0]["stats"], start) and not same(ends[1]["stats"], ends[0]["stats"])  # torch: updates
    assert same(ends[2]["stats"], ends[1]["stats"]) and same(ends[4]["stats"], ends[1]["stats"])  # frozen_stats
    assert not same(ends[4]["affine"], ends[2]["affine"])  # ...while weight and bias still learn
    assert schedule.current.name == "frozen_stats" and model[1].policy.name == "frozen_stats"
    schedule.remove()
    assert type(model[1]) is nn.BatchNorm1d and type(model[4]) is nn.BatchNorm1d
    assert schedule.current is None


def test_by_step_and_with_include():
    model = make_model()
    with bnctl.Schedule({0: "frozen", 4: "torch"}, include="4", unit="step") as schedule:
        ends = trainer_loop(model, 2, lambda epoch: None, lambda step: schedule.step(step, model))
        assert schedule.policy_at(3).name == "frozen" and schedule.policy_at(4).name == "torch"
        assert type(model[1]) is nn.BatchNorm1d and model[4].policy.name == "torch"
    assert type(model[4]) is nn.BatchNorm1d
    # layer 1 was never under the schedule: plain torch, one update per step (and the warm-up; none in eval());
    # layer 4 froze for steps 0-3 and updated at steps 4 and 5
    assert int(ends[1]["stats"]["1.num_batches_tracked"]) == 1 + 6
    assert int(ends[0]["stats"]["4.num_batches_tracked"]) == 1 and int(ends[1]["stats"]["4.num_batches_tracked"]) == 3


def test_a_value_before_the_first_key_and_a_none_entry_mean_plain_layers():
    model = make_model()
    schedule = bnctl.Schedule({2: "frozen", 4: None}, model=model)
    assert schedule.step(0) is None and type(model[1]) is nn.BatchNorm1d
    assert schedule.step(2).name == "frozen" and model[1].policy.name == "frozen"
    assert schedule.step(5) is None and type(model[1]) is nn.BatchNorm1d
    assert repr(schedule) == "Schedule({2: 'frozen', 4: None}, unit='epoch')"


def test_step_within_an_entry_changes_nothing(monkeypatch):
    import bnctl.schedule as module

    calls = []
    real = module.apply
    monkeypatch.setattr(module, "apply", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    model = make_model()
    schedule = bnctl.Schedule({0: "torch", 3: "frozen_stats", 5: "frozen_stats"}, model=model)
    for epoch in range(8):
        schedule.step(epoch)
        schedule.step(epoch)
    assert [p.name for p in calls] == ["torch", "frozen_stats"]  # 5 holds the same policy as 3
    schedule.remove()
    schedule.remove()  # idempotent


def test_remove_restores_the_model_exactly():
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    schedule = bnctl.Schedule("frozen", model=model)
    schedule.step(0)
    assert not model[1].weight.requires_grad
    schedule.remove()
    assert same(model.state_dict(), state) and [p.requires_grad for p in model.parameters()] == flags


def test_bad_schedules_are_refused_before_anything_changes():
    with pytest.raises(ValueError, match="ints >= 0"):
        bnctl.Schedule({-1: "torch"})
    with pytest.raises(ValueError, match="ints >= 0"):
        bnctl.Schedule({0.5: "torch"})
    with pytest.raises(ValueError, match="Unknown BatchNorm policy 'frozn'"):
        bnctl.Schedule({0: "torch", 3: "frozn"})
    with pytest.raises(ValueError, match="unit to be one of"):
        bnctl.Schedule("torch", unit="batch")
    with pytest.raises(ValueError, match="non-empty mapping"):
        bnctl.Schedule({})
    with pytest.raises(ValueError, match="expected a model"):
        bnctl.Schedule("torch").step(0)
    schedule = bnctl.Schedule("frozen")
    model = make_model()
    schedule.step(0, model)
    with pytest.raises(ValueError, match="another one. Call schedule.remove"):
        schedule.step(1, make_model())
    schedule.remove()
    other = make_model()
    schedule.step(0, other)  # after remove, another model is fine
    assert other[1].policy.name == "frozen" and type(model[1]) is nn.BatchNorm1d
    schedule.remove()


# -- the Lightning callback, driven by a look-alike trainer -------------------------------------------------------


@pytest.fixture
def lightning_callback(monkeypatch):
    """BatchNormPolicy built on a stand-in ``pytorch_lightning.Callback`` (whatever is installed)."""
    fake = types.ModuleType("pytorch_lightning")

    class Callback:
        pass

    fake.Callback = Callback
    monkeypatch.setitem(sys.modules, "lightning", None)  # `import lightning.pytorch` fails: the fallback is used
    monkeypatch.setitem(sys.modules, "pytorch_lightning", fake)
    module = importlib.import_module("bnctl.integrations.lightning")
    monkeypatch.delitem(vars(module), "BatchNormPolicy", raising=False)
    cls = module.BatchNormPolicy
    assert issubclass(cls, Callback) and cls.__module__ == module.__name__
    yield cls
    monkeypatch.delitem(vars(module), "BatchNormPolicy", raising=False)


class Trainer:
    """Calls a callback's hooks in Lightning's order around a loop like trainer_loop's, sanity check included."""

    def __init__(self, callback, epochs: int):
        self.callback, self.epochs = callback, epochs
        self.current_epoch = self.global_step = 0

    def fit(self, module: nn.Module, fail_at_epoch: int | None = None) -> list[dict]:
        cb = self.callback
        try:
            cb.on_fit_start(self, module)
            module.eval()  # sanity check validation
            with torch.no_grad():
                module(batches(100)[0][0])
            module.train()

            def epoch_start(epoch):
                self.current_epoch = epoch
                if epoch == fail_at_epoch:
                    raise RuntimeError("failed in training")
                cb.on_train_epoch_start(self, module)

            def step(i):
                self.global_step = i
                cb.on_train_batch_start(self, module, None, i)

            ends = trainer_loop(module, self.epochs, epoch_start, step)
            cb.on_fit_end(self, module)
            return ends
        except BaseException as err:
            cb.on_exception(self, module, err)
            raise
        finally:
            cb.teardown(self, module, "fit")


def test_callback_schedule_survives_the_trainer_and_is_removed_after_fit(lightning_callback):
    model = make_model()
    start = statistics(model)
    callback = lightning_callback(schedule={0: "torch", 2: "frozen_stats"})
    ends = Trainer(callback, 4).fit(model)
    assert not same(ends[1]["stats"], start) and not same(ends[1]["stats"], ends[0]["stats"])
    assert same(ends[3]["stats"], ends[1]["stats"]) and not same(ends[3]["affine"], ends[1]["affine"])
    assert type(model[1]) is nn.BatchNorm1d and type(model[4]) is nn.BatchNorm1d  # plain again after fit
    assert repr(callback) == "BatchNormPolicy(Schedule({0: 'torch', 2: 'frozen_stats'}, unit='epoch'))"


def test_callback_with_one_policy_by_step_and_on_failure(lightning_callback):
    model = make_model()
    start = statistics(model)
    ends = Trainer(lightning_callback("frozen", include="1"), 2).fit(model)
    assert all(torch.equal(ends[-1]["stats"][k], v) for k, v in start.items() if k.startswith("1."))
    assert not torch.equal(ends[-1]["stats"]["4.running_mean"], start["4.running_mean"])
    model = make_model()
    callback = lightning_callback(bnctl.Schedule({0: "torch", 2: "frozen"}, unit="step"))
    with pytest.raises(RuntimeError, match="failed in training"):
        Trainer(callback, 3).fit(model, fail_at_epoch=1)
    assert type(model[1]) is nn.BatchNorm1d and model[1].weight.requires_grad  # nothing left behind


def test_callback_arguments(lightning_callback):
    with pytest.raises(ValueError, match="got both"):
        lightning_callback("torch", schedule={0: "frozen"})
    with pytest.raises(ValueError, match="got neither"):
        lightning_callback()
    with pytest.raises(ValueError, match="carries its own include/exclude"):
        lightning_callback(schedule=bnctl.Schedule("frozen"), include="1")


def test_without_lightning_the_callback_says_what_to_install(monkeypatch):
    module = importlib.import_module("bnctl.integrations.lightning")  # the module itself imports without it
    monkeypatch.delitem(vars(module), "BatchNormPolicy", raising=False)
    block_imports(monkeypatch, "lightning")
    block_imports(monkeypatch, "pytorch_lightning")
    with pytest.raises(ImportError, match="pip install lightning"):
        from bnctl.integrations.lightning import BatchNormPolicy  # noqa: F401
    monkeypatch.delitem(vars(module), "BatchNormPolicy", raising=False)
