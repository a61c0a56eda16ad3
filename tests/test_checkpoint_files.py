"""Reading checkpoints safely and checking their BatchNorm statistics (bnctl.checkpoint)."""

import warnings

import pytest
import torch
from torch import nn

from bnctl.checkpoint_files import CheckpointError, check_checkpoint, load_state_dict
from conftest import trained_state


def quantized(t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated; checkpoints may still hold them
        return torch.quantize_per_tensor(t, 0.1, 0, torch.quint8)


def layer(state, name):
    return next(c for c in check_checkpoint(state) if c.name == name)


def test_clean_state_has_no_problems():
    checks = check_checkpoint(trained_state())
    assert [c.name for c in checks] == ["1", "4"] and all(not c.problems for c in checks)
    assert checks[0].channels == 4 and checks[0].num_batches_tracked == 1


def test_value_problems():
    state = trained_state()
    state["1.running_var"][0] = float("nan")
    state["1.weight"][1] = 0.0
    state["4.running_mean"].fill_(2e6)
    problems = " | ".join(layer(state, "1").problems + layer(state, "4").problems)
    assert "non-finite values in running_var (1 channel)" in problems
    assert "1 channel(s) with near-zero weight" in problems and "extreme values" in problems


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("running_mean", torch.zeros(2, 2), "running_mean: expected a 1-D floating-point tensor, got a strided "
                                            "float32 tensor of shape (2, 2)"),
        ("running_var", torch.ones(5), "expected one length per channel"),
        ("running_var", torch.ones(4, dtype=torch.complex64), "running_var: expected a 1-D floating-point"),
        ("running_var", torch.ones(4).to_sparse(), "running_var: expected a 1-D floating-point tensor, got a "
                                                   "sparse_coo"),
        ("running_mean", quantized(torch.zeros(4)), "got a quantized"),
        ("running_mean", torch.zeros(4, device="meta"), "got a meta"),
        ("weight", torch.ones(4, dtype=torch.long), "weight: expected a 1-D floating-point"),
        ("num_batches_tracked", torch.tensor(float("nan")), "num_batches_tracked: expected a count"),
        ("num_batches_tracked", torch.tensor(1 + 2j), "num_batches_tracked: expected a count"),
        ("num_batches_tracked", torch.tensor([1, 2]), "num_batches_tracked: expected a count"),
    ],
)
def test_tensors_that_are_not_statistics_are_problems_not_crashes(key, value, expected):
    state = trained_state()
    state["1." + key] = value
    assert any(expected in p for p in layer(state, "1").problems), layer(state, "1").problems


def test_load_state_dict_unwraps_and_strips_ddp_prefix(tmp_path):
    state = trained_state()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    assert list(load_state_dict(path)) == list(state)


def test_load_state_dict_tells_garbage_from_a_pickled_model(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(16)))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_state_dict(garbage)
    model = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.BatchNorm1d(3)), model)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_state_dict(model)
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "missing.pt")


def test_per_domain_statistics_are_checked_like_the_default_ones():
    import bnctl

    model = nn.Sequential(nn.BatchNorm1d(3))
    model.train()(torch.randn(8, 3))
    bnctl.add_domains(model, "target")
    state = model.state_dict()
    state["0.running_var__target"][1] = float("inf")
    checks = check_checkpoint(state)
    assert [(c.name, c.domain) for c in checks] == [("0", "default"), ("0", "target")]
    assert not checks[0].problems and "non-finite values in running_var" in checks[1].problems[0]


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod.", "model.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    state = trained_state()
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, tmp_path / "c.pt")
    assert list(load_state_dict(tmp_path / "c.pt")) == list(state)


def test_a_negative_running_var_is_a_problem():
    """No forward can use it: normalizing takes the square root of running_var + eps."""
    state = trained_state()
    state["1.running_var"][2] = -0.5
    assert layer(state, "1").problems == [
        "1 channel(s) with negative running_var (a variance cannot be negative; normalizing takes its square "
        "root: NaN or huge outputs)"]
