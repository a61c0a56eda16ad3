"""bnctl with PyTorch Lightning's fine-tuning helpers (``BaseFinetuning``), which switch ``requires_grad``
and ``track_running_stats`` on BatchNorm layers behind the policy's back.

- ``make_trainable`` after ``frozen``: ``requires_grad`` is back on, but the policy still freezes the
  affine part (no gradient) and ``bnctl.report`` says so; also through a ``Trainer`` with a
  ``BaseFinetuning`` callback, whose ``model.train()`` and optimizer change nothing in the layers.
- ``freeze(train_bn=True)`` after ``frozen_stats``: consistent with the policy (only BatchNorm's affine
  part learns, statistics stay).
- ``freeze(train_bn=False)`` after ``frozen_stats``: current behaviour documented (the policy keeps
  normalizing with the running statistics; report flags both switches).
"""

from __future__ import annotations

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from _support import CLASSES, batchnorms, images, labels, state, warmed
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn

import bnctl


@functools.cache
def _base() -> nn.Module:
    torch.manual_seed(0)
    return warmed(torchvision.models.resnet18(weights=None, num_classes=CLASSES))


def resnet(preset: str) -> nn.Module:
    model = copy.deepcopy(_base())
    bnctl.apply(model, preset)
    return model


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state(model).items() if "running_" in k or "num_batches_tracked" in k}


def backward(model: nn.Module) -> None:
    model.zero_grad()
    F.cross_entropy(model.train()(images(0)), labels(0)).backward()


def warnings_of(model: nn.Module) -> list[list[str]]:
    return [row.warnings for row in bnctl.report(model).layers]


def test_make_trainable_cannot_unfreeze_a_frozen_policy_and_report_says_so():
    model = resnet("frozen")
    before = statistics(model)
    BaseFinetuning.make_trainable(model)
    assert all(p.requires_grad for p in model.parameters())
    backward(model)
    for layer in batchnorms(model):
        assert layer.weight.grad is None and layer.bias.grad is None
    assert model.conv1.weight.grad is not None
    assert statistics(model).keys() == before.keys()
    assert all(torch.equal(statistics(model)[k], v) for k, v in before.items())
    for found in warnings_of(model):
        assert any("requires_grad=True, but the policy freezes them" in w for w in found), found


def test_freeze_train_bn_after_frozen_stats_trains_only_batchnorm_affine():
    model = resnet("frozen_stats")
    before = statistics(model)
    BaseFinetuning.freeze(model, train_bn=True)
    layers = batchnorms(model)
    assert all(layer.track_running_stats for layer in layers)
    assert {p.requires_grad for layer in layers for p in layer.parameters()} == {True}
    assert not any(p.requires_grad for m in model.modules() if m not in layers for p in m.parameters(recurse=False))
    backward(model)
    assert all(layer.weight.grad is not None and layer.bias.grad is not None for layer in layers)
    assert all(torch.equal(statistics(model)[k], v) for k, v in before.items())  # the policy keeps them
    with torch.no_grad():
        assert torch.equal(model.train()(images(1)), model.eval()(images(1)))
    assert warnings_of(model) == [[] for _ in layers]


def test_freeze_without_train_bn_after_frozen_stats_keeps_running_statistics():
    """Lightning switches track_running_stats off (torch: batch statistics in train()); the policy still
    normalizes with the running statistics in both modes and updates nothing. Report flags the frozen
    affine; switching track_running_stats off changes nothing under this policy, so it is not flagged."""
    model = resnet("frozen_stats")
    before = statistics(model)
    BaseFinetuning.freeze(model, train_bn=False)
    layers = batchnorms(model)
    assert not any(layer.track_running_stats for layer in layers)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model.train()(images(1)), model.eval()(images(1)))
    assert all(torch.equal(statistics(model)[k], v) for k, v in before.items())
    rows = bnctl.report(model).layers
    assert {(r.train, r.eval, r.affine) for r in rows} == {("running/none", "running/none", "frozen")}
    for row in rows:
        assert any("requires_grad=False was set after bnctl.apply" in w for w in row.warnings), row.warnings
        assert not any("track_running_stats" in w for w in row.warnings), row.warnings


def test_track_running_stats_warning_agrees_with_the_reported_behaviour():
    model = resnet("frozen_stats")
    BaseFinetuning.freeze(model, train_bn=False)
    row = bnctl.report(model).layers[0]
    assert row.train == "running/none"
    assert not any("train() normalizes with batch statistics" in w for w in row.warnings), row.warnings


# -- through a Trainer ----------------------------------------------------------------------------


class Classifier(pl.LightningModule):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.fc.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)


class UnfreezeBackbone(BaseFinetuning):
    """Backbone frozen, then at epoch 0 made trainable (train_bn=True) and added to the optimizer."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.model.layer4, train_bn=False)

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == 0:
            self.unfreeze_and_add_param_group(pl_module.model.layer4, optimizer, lr=0.1, train_bn=True)


@pytest.mark.filterwarnings("ignore:.*LeafSpec", "ignore:.*does not have many workers")
def test_trainer_finetuning_callback_cannot_unfreeze_or_update_a_frozen_policy(tmp_path):
    model = resnet("frozen")
    before = state(model)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images(0, n=12), labels(0, n=12)), batch_size=4, shuffle=False
    )
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[UnfreezeBackbone()], default_root_dir=tmp_path,
    )
    trainer.fit(Classifier(model), train_dataloaders=data)
    assert model.layer4[0].conv1.weight.requires_grad and model.layer4[0].bn1.weight.requires_grad
    after = state(model)
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])  # it trained...
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    for k, v in before.items():  # ...and BatchNorm, weight and statistics alike, stayed as it was
        if ".bn" in k or k.startswith("bn1.") or ".downsample.1." in k:
            assert torch.equal(after[k], v), k


# -- bnctl's own callback: BatchNormPolicy (policies and schedules for the length of fit) ---------------------------


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return warmed(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(8, CLASSES)))


class Recorded(pl.LightningModule):
    """A classifier that keeps its BatchNorm statistics and affine values at the end of every training epoch, and
    the training flag of its first BatchNorm layer seen in each validation step."""

    def __init__(self, model: nn.Module, fail_at_epoch: int | None = None):
        super().__init__()
        self.model, self.fail_at_epoch = model, fail_at_epoch
        self.ends: list[dict[str, dict[str, torch.Tensor]]] = []
        self.validated_in_eval: list[bool] = []

    def training_step(self, batch, batch_idx):
        if self.current_epoch == self.fail_at_epoch:
            raise RuntimeError("failed in training_step")
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        self.validated_in_eval.append(not self.model[1].training)
        x, y = batch
        self.model(x)

    def on_train_epoch_end(self):
        self.ends.append({"stats": statistics(self.model),
                          "affine": {k: v for k, v in state(self.model).items() if k.startswith(("1.", "4."))
                                     and ("weight" in k or "bias" in k)}})

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)


def _fit(module: pl.LightningModule, callbacks: list, tmp_path, epochs: int = 4) -> None:
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images(0, n=16), labels(0, n=16)), batch_size=4, shuffle=False)
    val = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images(1, n=8), labels(1, n=8)), batch_size=4, shuffle=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=val)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_QUIET = ("ignore:.*does not have many workers", "ignore:.*LeafSpec", "ignore:.*smaller than the logging interval")


@pytest.mark.filterwarnings(*_QUIET)
def test_callback_schedule_warm_up_then_frozen_statistics_through_a_trainer(tmp_path):
    from bnctl.integrations.lightning import BatchNormPolicy

    net = _small_net()
    start = statistics(net)
    module = Recorded(net)
    _fit(module, [BatchNormPolicy(schedule={0: "torch", 2: "frozen_stats"})], tmp_path)
    ends = module.ends
    assert len(ends) == 4 and module.validated_in_eval and all(module.validated_in_eval)  # Lightning's eval() ran
    assert not _same(ends[0]["stats"], start) and not _same(ends[1]["stats"], ends[0]["stats"])  # torch: updated
    assert _same(ends[2]["stats"], ends[1]["stats"]) and _same(ends[3]["stats"], ends[1]["stats"])  # frozen_stats
    assert not _same(ends[3]["affine"], ends[1]["affine"])  # weight and bias kept learning
    assert all(type(m) is nn.BatchNorm2d for m in batchnorms(net))  # plain torch again after fit
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.filterwarnings(*_QUIET)
def test_callback_frozen_through_a_trainer_and_nothing_left_after_a_failure(tmp_path):
    from bnctl.integrations.lightning import BatchNormPolicy

    net = _small_net()
    before = state(net)
    _fit(Recorded(net), [BatchNormPolicy("frozen", include="model.1")], tmp_path, epochs=2)
    after = state(net)
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("1."))  # statistics and affine
    assert not torch.equal(after["4.running_mean"], before["4.running_mean"])  # not selected: plain torch
    assert not torch.equal(after["0.weight"], before["0.weight"])  # the rest trained

    net = _small_net()
    with pytest.raises(RuntimeError, match="failed in training_step"):
        _fit(Recorded(net, fail_at_epoch=1), [BatchNormPolicy(schedule={0: "torch", 1: "frozen"})], tmp_path)
    assert all(type(m) is nn.BatchNorm2d for m in batchnorms(net))
    assert all(p.requires_grad for p in net.parameters())


class FreezeByHand(pl.Callback):
    """What people write instead: ``bn.eval()`` and ``requires_grad=False`` once, when fitting starts."""

    def on_fit_start(self, trainer, pl_module):
        for layer in batchnorms(pl_module):
            layer.eval()
            layer.weight.requires_grad_(False)
            layer.bias.requires_grad_(False)


class TrainEachEpoch(Recorded):
    """A module that calls ``model.train()`` at each epoch, as much older training code does (Lightning 2.x itself
    restores the modules' modes after validation)."""

    def on_train_epoch_start(self):
        self.model.train()


@pytest.mark.filterwarnings(*_QUIET, "ignore:Found .* module.* in eval mode")
def test_a_bn_eval_made_by_hand_does_not_survive_a_model_train_but_the_policy_does(tmp_path):
    from bnctl.integrations.lightning import BatchNormPolicy

    by_hand, policy = _small_net(), _small_net()
    start = statistics(by_hand)
    _fit(TrainEachEpoch(by_hand), [FreezeByHand()], tmp_path, epochs=2)
    _fit(TrainEachEpoch(policy), [BatchNormPolicy("frozen")], tmp_path, epochs=2)
    assert not _same(statistics(by_hand), start)  # model.train() switched bn.eval() back: statistics updated
    assert _same(statistics(policy), start)


@pytest.mark.filterwarnings(*_QUIET)
def test_callback_by_step(tmp_path):
    from bnctl.integrations.lightning import BatchNormPolicy

    net = _small_net()
    start = int(net[1].num_batches_tracked)
    _fit(Recorded(net), [BatchNormPolicy(schedule={0: "frozen", 6: "torch"}, unit="step")], tmp_path, epochs=2)
    assert int(net[1].num_batches_tracked) - start == 2 * 4 - 6  # 4 batches per epoch; updates from step 6 on
