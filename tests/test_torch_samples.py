"""PyTorch's own BatchNorm samples (``module_db``, the inputs PyTorch tests its modules with), replayed
against bnctl's ``torch`` preset: outputs, gradients and buffers bit-identical, in float32 and float64,
train() and eval(), contiguous, non-contiguous and channels_last inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import module_db
from torch.testing._internal.common_utils import noncontiguous_like

import bnctl

INFOS = [m for m in module_db if m.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]
LAYOUTS = ["contiguous", "noncontiguous", "channels_last"]


def _cases():
    for info in INFOS:
        for dtype in (torch.float32, torch.float64):
            for training in (True, False):
                samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                  training=training)
                for i, sample in enumerate(samples):
                    mode = "train" if training else "eval"
                    name = f"{info.module_cls.__name__}-{sample.desc or i}-{str(dtype)[6:]}-{mode}"
                    yield pytest.param(info, dtype, training, i, id=name)


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor | None:
    if layout == "noncontiguous":
        return noncontiguous_like(x)
    if layout == "channels_last":
        if x.dim() not in (4, 5):
            return None
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.detach().to(memory_format=fmt).requires_grad_(x.requires_grad)
    return x


def test_the_samples_cover_the_batchnorm_classes():
    assert len(INFOS) == 3 and any("zero_batch" in s.desc for s in INFOS[0].module_inputs_func(
        INFOS[0], device="cpu", dtype=torch.float32, requires_grad=False, training=True))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("info, dtype, training, index", list(_cases()))
def test_torch_preset_replays_pytorchs_samples_bit_for_bit(info, dtype, training, index, layout):
    samples = list(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training))
    sample = samples[index]
    x = _laid_out(sample.forward_input.args[0], layout)
    if x is None:
        pytest.skip("channels_last needs a 4-d or 5-d input")
    torch.manual_seed(0)
    native = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs).to(dtype)
    ours = copy.deepcopy(native)
    bnctl.apply(ours, "torch")
    for module in (native, ours):
        module.train(training)
    for step in range(3):  # a few forwards: momentum=None averages over num_batches_tracked
        inputs = [x * (step + 1) + step for _ in range(2)]
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        y_native, y_ours = native(inputs[0]), ours(inputs[1])
        assert torch.equal(y_ours, y_native) and y_ours.stride() == y_native.stride()
        if y_native.numel():
            g = torch.randn(y_native.shape, generator=torch.Generator().manual_seed(step), dtype=dtype)
            y_native.backward(g)
            y_ours.backward(g)
            assert torch.equal(inputs[1].grad, inputs[0].grad)
        for (k, a), b in zip(native.state_dict().items(), ours.state_dict().values()):
            assert torch.equal(b, a), k
    for (k, p), q in zip(native.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(q.grad, p.grad)), k
