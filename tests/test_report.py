"""bnctl.report(): effective behaviour, traps, statistics shift; nothing changes."""

import copy
import dataclasses
import re

import pytest
import torch
from torch import nn

import bnctl
from bnctl.report import MEAN_SHIFT
from conftest import BatchNormAct2d, KeywordModel


def trained():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 36, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for _ in range(3):
            m.train()(torch.randn(16, 1, 8, 8))
    return m


def test_effective_behaviour_per_layer():
    m = trained()
    bnctl.apply(m, "running_update", include="1")
    bnctl.apply(m, bnctl.Policy("batch", "none", 0.3, "none"), include="5")
    r = bnctl.report(m)
    rows = {x.name: x for x in r.layers}
    assert (rows["1"].train, rows["1"].eval, rows["1"].policy) == ("running/ema", "running/none", "running_update")
    assert (rows["5"].train, rows["5"].eval, rows["5"].policy) == ("batch/none", "blend(0.3)/none", "custom")
    assert rows["1"].num_batches_tracked == 3 and rows["1"].affine == "learns"
    assert r.warnings == []
    text = str(r)
    assert "running_update" in text and "2 BatchNorm layer(s), 0 warning(s)" in text
    assert r.records()[0]["name"] == "1"


def test_traps_are_flagged():
    m = trained()
    m[1].weight.requires_grad_(False)
    m[1].bias.requires_grad_(False)
    m[5].track_running_stats = False
    m[5].momentum = 0.99
    fresh = nn.BatchNorm1d(3)
    r = bnctl.report(nn.Sequential(m, fresh))
    text = " | ".join(r.warnings)
    assert "0.1: weight/bias have requires_grad=False but the running statistics still update" in text
    assert "0.5: track_running_stats was switched off" in text
    assert "momentum=0.99 looks like a Keras/Flax decay" in text
    assert "1: running statistics never updated" in text


def test_with_batch_measures_shift_and_changes_nothing():
    m = trained().eval()
    bnctl.apply(m, "frozen_stats")
    state = copy.deepcopy(m.state_dict())
    flags = [mod.training for mod in m.modules()]
    r = bnctl.report(m, torch.randn(16, 1, 8, 8) * 3 + 2)  # shifted data
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [mod.training for mod in m.modules()] == flags
    first = r.layers[0]
    assert first.mean_shift > 1.0 and first.log_var_ratio > 0.5 and first.train_eval_gap > 0.1
    same = bnctl.report(trained().eval(), torch.randn(256, 1, 8, 8))
    assert same.layers[0].mean_shift < first.mean_shift
    assert "mean shift" in str(r)


def test_skipped_updates_are_reported():
    bn = bnctl.BatchNorm1d(2)
    x = torch.randn(4, 2)
    x[0, 0] = float("nan")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn.train()(x)
    r = bnctl.report(bn)
    assert r.layers[0].skipped_updates == 1
    assert any("1 running update(s) skipped" in w for w in r.warnings)


def test_a_model_without_batchnorm():
    r = bnctl.report(nn.Sequential(nn.Linear(2, 2)))
    assert r.layers == [] and str(r) == "no BatchNorm layers"


def test_dict_batches_and_forward_like_recalibrate():
    assert bnctl.report(KeywordModel(), {"inputs": torch.randn(8, 3) + 4}).layers[0].mean_shift > 1
    r = bnctl.report(KeywordModel(), ("ignored", torch.randn(8, 3)), forward=lambda m, b: m(b[1]))
    assert r.layers[0].mean_shift is not None


def test_with_batch_changes_nothing_in_layers_bnctl_cannot_control():
    model = nn.Sequential(BatchNormAct2d(3), nn.BatchNorm2d(3)).train()
    before = copy.deepcopy(model.state_dict())
    r = bnctl.report(model, torch.randn(4, 3, 2, 2) + 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert r.layers[0].mean_shift > 1 and type(model[1]) is nn.BatchNorm2d


def test_uninitialized_lazy_layers():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.LazyBatchNorm2d())
    r = bnctl.report(model)
    assert "uninitialized lazy layer" in r.warnings[0] and r.layers[0].train == "-"
    with pytest.raises(ValueError, match=r"^1: expected a materialized layer"):
        bnctl.report(model, torch.randn(2, 1, 2, 2))


def test_forum_setting_2_reports_batch_statistics_in_training_not_updates():
    """train() + momentum=0 + frozen affine: the statistics stay; batch statistics still normalize."""
    m = trained()
    m[1].momentum = 0.0
    m[1].weight.requires_grad_(False)
    m[1].bias.requires_grad_(False)
    text = " | ".join(bnctl.report(m).warnings)
    assert "momentum=0 keeps the running statistics, but train() still normalizes with batch statistics" in text
    assert "still update" not in text


def test_track_running_stats_switched_off_is_reported_as_what_it_changes_under_the_policy():
    bn = nn.BatchNorm2d(3)
    bn.track_running_stats = False  # Lightning's BaseFinetuning.freeze_module does this
    with bnctl.using(bn, "frozen_stats"):  # never updates anyway: nothing changed
        assert not any("track_running_stats" in w for w in bnctl.report(bn).warnings)
    with bnctl.using(bn, "running_update"):
        (text,) = [w for w in bnctl.report(bn).warnings if "track_running_stats" in w]
        assert text.endswith("no longer update in train(), and train() and eval() normalize with those stale buffers")


def test_a_negative_running_var_is_flagged_also_on_frozen_batchnorm():
    from conftest import FrozenBatchNorm2d

    m = trained()
    with torch.no_grad():
        m[1].running_var[0] = -1e-3
    frozen = FrozenBatchNorm2d(3)
    frozen.running_var[1] = -2.0
    text = " | ".join(bnctl.report(nn.Sequential(m, frozen)).warnings)
    assert "0.1: negative running_var in 1 channel(s)" in text and "1: negative running_var in 1 channel(s)" in text


def test_shift_past_a_threshold_is_flagged_with_advice_and_noise_is_not():
    model = trained().eval()
    shifted = bnctl.report(model, torch.randn(16, 1, 8, 8) * 3 + 2)
    first = shifted.layers[0]
    assert first.mean_shift > MEAN_SHIFT
    (warning,) = [w for w in first.warnings if "far from this data" in w]
    assert "bnctl.recalibrate" in warning and "'test_time'" in warning
    assert re.search(r"mean shift \d\.\d{3} > 0\.5.*log var ratio \d\.\d{3} > 0\.693", warning)
    assert "! 1: statistics far from this data" in str(shifted)
    bnctl.recalibrate(model, [torch.randn(256, 1, 8, 8)])
    same = bnctl.report(model, torch.randn(256, 1, 8, 8))  # data like the one the statistics came from
    assert not [w for w in same.warnings if "far from this data" in w]
    tiny = bnctl.report(model[:2], torch.randn(2, 1, 3, 3))  # 2 values per channel: mostly noise
    assert tiny.layers[0].mean_shift is not None
    assert not [w for w in tiny.layers[0].warnings if "far from this data" in w]


def test_renorm_in_warm_up_is_flagged_with_the_one_line_fix():
    model = trained()
    bnctl.apply(model, "renorm", include="1")
    bnctl.apply(model, dataclasses.replace(bnctl.PRESETS["renorm"], renorm_warmup=(2, 10)), include="5")
    text = " | ".join(bnctl.report(model).warnings)
    assert "1: Batch Renormalization is in its warm-up: until num_batches_tracked reaches 5000 (now 3)" in text
    assert "renorm_warmup=(0, 1000)" in text and "exactly the 'torch' preset" in text
    assert "5: Batch" not in text  # past its (shortened) warm-up start
