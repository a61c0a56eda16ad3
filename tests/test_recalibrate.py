"""recalibrate()."""

import copy

import pytest
import torch
from torch import nn

import bnctl
from conftest import BatchNormAct2d, KeywordModel, block_imports, data, make_model


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
    model = KeywordModel()
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


# -- no values, no change ---------------------------------------------------------------------


def tracked(n=3, batches=7):
    bn = nn.BatchNorm1d(n)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.num_batches_tracked.fill_(batches)
    return bn


def assert_unchanged(bn, batches=7):
    assert int(bn.num_batches_tracked) == batches and torch.equal(bn.running_mean, torch.full((3,), 0.5))


def test_empty_batches_change_nothing_and_are_not_reported_as_recalibrated():
    bn = tracked()
    with pytest.raises(ValueError, match="only empty batches"):
        bnctl.recalibrate(bn, [torch.randn(0, 3)])
    assert_unchanged(bn)
    with pytest.warns(UserWarning, match="only empty batches"):
        assert bnctl.recalibrate(bn, [torch.randn(0, 3)] * 2, strict=False) == []
    assert_unchanged(bn)


def test_an_empty_loader_is_named_as_the_cause():
    bn = tracked()
    with pytest.raises(ValueError, match="empty data iterable"):
        bnctl.recalibrate(bn, [])
    with pytest.warns(UserWarning, match="empty data iterable"):
        assert bnctl.recalibrate(bn, [], strict=False) == []
    assert_unchanged(bn)


def test_unreached_layers_keep_their_statistics_with_strict_false():
    model = nn.ModuleDict({"used": tracked(), "unused": tracked()})
    with pytest.warns(UserWarning, match="never reached"):
        done = bnctl.recalibrate(model, [torch.randn(4, 3)], forward=lambda m, b: m["used"](b), strict=False)
    assert done == ["used"] and int(model["used"].num_batches_tracked) == 1
    assert_unchanged(model["unused"])


def test_layers_with_tracking_switched_off_are_skipped_with_a_warning():
    model = nn.Sequential(tracked(), tracked())
    model[1].track_running_stats = False
    with pytest.warns(UserWarning, match=r"track_running_stats is False: \['1'\]"):
        assert bnctl.recalibrate(model, [torch.randn(4, 3)]) == ["0"]
    assert_unchanged(model[1])


def test_selected_layers_only_in_a_model_in_train():
    """'Nothing else changes': the other layers do not update their EMA during the pass."""
    model = nn.Sequential(tracked(), tracked()).train()
    assert bnctl.recalibrate(model, [torch.randn(8, 3) + 5], layers="1") == ["1"]
    assert_unchanged(model[0])
    assert int(model[1].num_batches_tracked) == 1
    assert type(model[0]) is nn.BatchNorm1d and model.training


def test_uninitialized_lazy_layer_is_named_before_anything_runs():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.LazyBatchNorm2d())
    calls = []
    with pytest.raises(ValueError, match=r"^1: expected a materialized layer"):
        bnctl.recalibrate(model, [data(4)], forward=lambda m, b: calls.append(m(b)))
    assert calls == []


def test_layers_bnctl_cannot_control_can_be_excluded_and_stay_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3), nn.BatchNorm2d(3)).train()
    before = model[1].running_mean.clone()
    with pytest.raises(TypeError, match=r"^1: .*exclude="):
        bnctl.recalibrate(model, [torch.randn(4, 3, 2, 2)])
    assert bnctl.recalibrate(model, [torch.randn(4, 3, 2, 2) + 3], exclude="1") == ["2"]
    assert torch.equal(model[1].running_mean, before) and int(model[1].num_batches_tracked) == 0
