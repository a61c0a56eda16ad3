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
