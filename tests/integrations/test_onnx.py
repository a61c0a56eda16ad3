"""bnctl models in eval() exported to ONNX (``torch.onnx.export``, dynamo=True and dynamo=False) and run in
onnxruntime: the same outputs as eager, for every preset.

The exported graph is run on a batch other than the example batch, whose statistics are far from the
running ones, so a graph that normalized with the wrong statistics (running statistics baked in where a
preset normalizes with the batch's in eval(), ``test_time``; or the example batch's statistics) would be
caught. ``recalibrate`` (a cumulative average, kept outside the buffers) is refused.
"""

from __future__ import annotations

import copy
import functools
import warnings

import onnxruntime as ort
import pytest
import torch
import torchvision
from _support import CLASSES, PRESETS, applied, images, warmed
from torch import nn

import bnctl

ATOL = 1e-4


@functools.cache
def _base(which: str) -> nn.Module:
    """A warmed model, never modified: a small conv-BN network (8x8 inputs) or torchvision's resnet18."""
    torch.manual_seed(0)
    if which == "resnet18":
        return warmed(torchvision.models.resnet18(weights=None, num_classes=CLASSES))
    return warmed(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4),
        )
    )


def onnx_output(model: nn.Module, example: torch.Tensor, x: torch.Tensor, dynamo: bool, path) -> torch.Tensor:
    """Export ``model`` with ``example``, run the file in onnxruntime on ``x``; the first output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer warnings
        torch.onnx.export(model, (example,), str(path), dynamo=dynamo, input_names=["x"], verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def check_export(which: str, preset: str, dynamo: bool, tmp_path) -> None:
    base = _base(which)
    size = 8 if which == "small" else 32
    example = images(0, size=size)
    x = images(1, size=size, shift=-3.0, scale=0.3)  # statistics unlike the running ones and the example's
    model = applied(base, preset).eval()
    want = copy.deepcopy(model)(x).detach()  # before export: recalibrate's eval() forwards update statistics
    got = onnx_output(model, example, x, dynamo, tmp_path / f"{which}_{preset}_{dynamo}.onnx")
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    if bnctl.PRESETS[preset].eval_normalize == "batch":  # the check above tells batch from running statistics
        with torch.no_grad():
            running = applied(base, "frozen").eval()(x)
        assert (running - want).abs().max() > 100 * ATOL


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "recalibrate"])
def test_onnx_export_of_every_preset_matches_eager(preset, dynamo, tmp_path):
    check_export("small", preset, dynamo, tmp_path)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_of_a_cumulative_average_is_refused(dynamo, tmp_path):
    """``recalibrate`` updates a cumulative average in eval() too, whose running sums an exported graph
    would hold as constants: the export raises naming the layer (the cause, under the exporter's error)."""
    model = applied(_base("small"), "recalibrate").eval()
    with pytest.raises(Exception) as info:
        onnx_output(model, images(0, size=8), images(1, size=8), dynamo, tmp_path / "recalibrate.onnx")
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("1: a cumulative average keeps its running sums outside" in text for text in chain), chain


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("preset", ["frozen", "test_time"])
def test_onnx_export_of_resnet18_matches_eager(preset, dynamo, tmp_path):
    check_export("resnet18", preset, dynamo, tmp_path)
