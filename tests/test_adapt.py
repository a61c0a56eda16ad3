"""prepare_test_time() and the TENT example."""

import copy
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnctl
from conftest import reference_bn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                      nn.Flatten(), nn.Linear(4 * 6 * 6, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        m.train()(torch.randn(16, 1, 8, 8))
    return m.train()


def test_prepare_test_time_freezes_all_but_bn_affine_and_restores_exactly():
    m = model()
    m[5].weight.requires_grad_(False)  # a flag that must come back as it was
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    state = copy.deepcopy(m.state_dict())
    handle = bnctl.prepare_test_time(m)
    assert handle.layers == ["1", "6"]
    assert {id(p) for p in handle.params} == {id(p) for i in (1, 6) for p in m[i].parameters()}
    assert all(not p.requires_grad for i in (0, 5) for p in m[i].parameters())
    assert not any(mod.training for mod in m.modules())
    x = torch.randn(8, 1, 8, 8)
    h = m[0](x)
    torch.testing.assert_close(m[1](h), reference_bn(h, None, None, m[1].weight, m[1].bias, "batch"))
    out = m(x)
    out.pow(2).sum().backward()
    assert m[0].weight.grad is None and m[1].weight.grad is not None
    handle.remove()
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(mod.training for mod in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k  # nothing updated the statistics
    assert type(m[1]) is nn.BatchNorm2d


def test_prepare_test_time_blend():
    m = model()
    with bnctl.prepare_test_time(m, alpha=0.25):
        h = torch.randn(8, 4, 6, 6)
        bn = m[1]
        want = reference_bn(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, 0.25)
        torch.testing.assert_close(bn(h), want)


def test_tent_example_runs():
    sys.path.insert(0, str(EXAMPLES))
    try:
        tent = runpy.run_path(str(EXAMPLES / "tent.py"))
        results = tent["main"](train_steps=20, tent_steps=2)
    finally:
        sys.path.remove(str(EXAMPLES))
    assert set(results) == {"source (eval)", "target, as is", "target, test-batch statistics",
                            "target, TENT"}
    assert all(0.0 <= v <= 1.0 for v in results.values())


def test_train_only_batchnorm_in_one_call_and_restores():
    m = model()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    state = copy.deepcopy(m.state_dict())
    with bnctl.train_only_batchnorm(m) as only_bn:
        assert {id(p) for p in only_bn.params} == {id(p) for i in (1, 6) for p in m[i].parameters()}
        assert [n for n, p in m.named_parameters() if p.requires_grad] == [
            "1.weight", "1.bias", "6.weight", "6.bias"]
        assert m.training and m[1].policy.name == "frozen_stats"
        opt = torch.optim.SGD(only_bn.params, lr=0.1)
        m(torch.randn(8, 1, 8, 8)).pow(2).sum().backward()
        opt.step()
        assert torch.equal(m[0].weight, state["0.weight"]) and not torch.equal(m[1].weight, state["1.weight"])
        assert torch.equal(m[1].running_mean, state["1.running_mean"])  # frozen_stats: statistics kept
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert type(m[1]) is nn.BatchNorm2d


def test_train_only_batchnorm_with_batch_statistics_and_bad_choices():
    m = model()
    with bnctl.train_only_batchnorm(m, "torch") as only_bn:
        assert len(only_bn.params) == 4 and m[1].policy.label == "torch(learn_affine=True)"
    with pytest.raises(ValueError, match="learn_affine=False"):
        bnctl.train_only_batchnorm(m, "frozen")
    plain = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False))
    with pytest.raises(ValueError, match="affine=False"):
        bnctl.train_only_batchnorm(plain)
    assert plain[0].weight.requires_grad and type(plain[1]) is nn.BatchNorm1d
