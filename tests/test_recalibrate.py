"""recalibrate()."""

import copy

import pytest
import torch
from torch import nn

import bnctl


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
    )


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g) * 3 + 2


def test_first_layer_exact_and_split_invariant():
    x = data()
    results = []
    for splits in ([48], [8] * 6, [5, 11, 32]):
        model = make_model().double().eval()
        bnctl.recalibrate(model, [(b, None) for b in torch.split(x.double(), splits)])
        results.append(model)
        assert int(model[1].num_batches_tracked) == len(splits)
    h = make_model().double()[0](x.double())
    want_mean = h.mean((0, 2, 3))
    want_var = h.transpose(0, 1).reshape(4, -1).var(1, unbiased=True)
    for model in results:
        torch.testing.assert_close(model[1].running_mean, want_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model[1].running_var, want_var, rtol=1e-10, atol=1e-10)


def test_other_modules_keep_their_mode_and_nothing_else_changes():
    model = make_model().eval()
    params = copy.deepcopy(dict(model.named_parameters()))
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append(torch.equal(i[0], o)))
    bnctl.recalibrate(model, [data(8)])
    assert seen == [True]  # dropout stayed off in a model in eval
    assert not model.training and all(not m.training for m in model.modules())
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]) and v.grad is None
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout) for m in model)


def test_restores_everything_on_error():
    model = make_model()
    bnctl.apply(model, "frozen_stats", include="1")
    state = copy.deepcopy(model.state_dict())

    def batches():
        yield data(8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bnctl.recalibrate(model, batches())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model[1].policy.name == "frozen_stats" and type(model[5]) is nn.BatchNorm2d


def test_unreached_layers_and_too_few_batches():
    model = nn.ModuleDict({"used": nn.BatchNorm1d(3), "unused": nn.BatchNorm1d(3)})
    fwd = lambda m, b: m["used"](b)  # noqa: E731
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="unused"):
        bnctl.recalibrate(model, [torch.randn(4, 3)], forward=fwd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.warns(UserWarning, match="unused"):
        assert bnctl.recalibrate(model, [torch.randn(4, 3)], forward=fwd, strict=False) == ["used"]
    with pytest.raises(ValueError, match="expected 3 batches, got 1"):
        bnctl.recalibrate(model, [torch.randn(4, 3)], 3, forward=fwd, strict=False)


def test_num_batches_and_dict_batches():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, inputs):
            return self.bn(inputs)

    model = Kw()
    bnctl.recalibrate(model, [{"inputs": torch.randn(4, 3)} for _ in range(5)], num_batches=2)
    assert int(model.bn.num_batches_tracked) == 2
    with pytest.raises(TypeError, match="forward="):
        bnctl.recalibrate(model, ["not a batch"])


def test_per_batch_estimator_is_update_bn_and_underestimates_variance():
    """estimator='per_batch' equals torch.optim.swa_utils.update_bn on the first layer."""
    from torch.optim.swa_utils import update_bn

    g = torch.Generator().manual_seed(3)
    # non-i.i.d. batches: each has its own offset, so the spread between batch means matters
    batches = [torch.randn(8, 2, 5, 5, generator=g) + 3 * i for i in range(4)]
    ours = make_model().double().eval()
    ref = copy.deepcopy(ours)
    bnctl.recalibrate(ours, [b.double() for b in batches], estimator="per_batch")
    update_bn([b.double() for b in batches], ref)
    torch.testing.assert_close(ours[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var)
    assert ours[1].momentum == 0.1  # momentum restored
    exact = copy.deepcopy(ours)
    bnctl.recalibrate(exact, [b.double() for b in batches])
    assert (exact[1].running_var > ours[1].running_var).all()


def test_progress_true_without_tqdm_warns_and_continues(monkeypatch):
    from conftest import block_imports

    block_imports(monkeypatch, "tqdm")
    model = make_model().eval()
    with pytest.warns(UserWarning, match="tqdm"):
        bnctl.recalibrate(model, [data(8)], progress=True)
    assert int(model[1].num_batches_tracked) == 1


def test_recalibrate_builds_no_graph():
    model = make_model().eval()
    seen = []
    bnctl.recalibrate(model, [data(8)], forward=lambda m, b: seen.append(m(b).requires_grad))
    assert seen == [False]
