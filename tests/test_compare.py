"""bnctl.compare: the best setting where it is known by construction, reproducibility, the original model left
alone, every kind of bad input named in its row, Ctrl-C, records/JSON/plot, and the engine's measurements."""

from __future__ import annotations

import copy
import functools
import json
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnctl
from bnctl.compare import (
    DEFAULT_SETTINGS,
    Recalibrate,
    Setting,
    as_setting,
    batchnorm_drift,
    batchnorm_tensors,
    compare,
    count_saved,
    fine_tune,
)
from conftest import block_imports

TIMINGS = ("seconds_per_step", "time_ratio", "eval_seconds", "seconds")


def sgd(lr: float, momentum: float = 0.0):
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)


# -- data and models whose best setting is known ------------------------------------------------------------


def images(n: int, seed: int, shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of 8x8 images: a fixed template per class plus noise; ``shifted``: 3 x + 2 (a new domain whose
    difference is affine in intensity, so recomputing the first layer's statistics undoes it)."""
    templates = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = templates[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=g)
    return (3 * x + 2 if shifted else x), y


def vectors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    templates = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return templates[y] + torch.randn(n, 16, generator=g), y


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        for i in range(0, len(x), batch):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + batch]), y[i : i + batch]).backward()
            opt.step()
    return model.eval()


@functools.cache
def _source_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    return pretrain(model, *images(512, 1), batch=32)


def source_cnn() -> nn.Module:
    return copy.deepcopy(_source_cnn())


@functools.cache
def _source_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    return pretrain(model, *vectors(512, 1), batch=64)


def loader(x: torch.Tensor, y: torch.Tensor, batch: int, shuffle: bool = True) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=shuffle)


def small_setup(n: int = 64) -> tuple[nn.Module, list, list]:
    """The source CNN, a few target batches and one validation batch."""
    x, y = images(n, 3, shifted=True)
    xv, yv = images(64, 4, shifted=True)
    return source_cnn(), [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)], [(xv, yv)]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


# -- acceptance: the best setting is found -------------------------------------------------------------------


def test_recalibration_wins_on_a_shifted_domain_by_more_than_the_spread():
    x, y = images(128, 3, shifted=True)
    result = compare(source_cnn(), loader(x, y, 32), [images(256, 4, shifted=True)], steps=3, seeds=[0, 1, 2],
                     optimizer=sgd(1e-3))
    assert [r.name for r in result.rows] == list(DEFAULT_SETTINGS)
    assert result.best == "recalibrate+frozen_stats", str(result)
    best = result.row("recalibrate+frozen_stats")
    others = [r for r in result.rows if r.name != result.best]
    runner_up = max(r.metric("val") for r in others)
    spread = max(best.metric_std("val"), *(r.metric_std("val") for r in others))
    assert best.metric("val") - runner_up > max(spread, 0.03), str(result)
    assert "recalibrate+frozen_stats is best by" in result.suggestion and "over 3 seeds" in result.suggestion
    assert "within noise" not in result.suggestion
    assert str(result).count("\n* recalibrate+frozen_stats") == 1
    # frozen kept the source statistics and weights; recalibration moved the statistics, not the affine part
    assert result.row("frozen").drift("stats") == (0.0, 0.0) and result.row("frozen").drift("affine")[0] == 0.0
    assert best.drift("stats")[0] > 0.5


def test_batch_statistics_lose_with_batches_of_two():
    x, y = vectors(128, 3)
    result = compare(_source_mlp(), loader(x, y, 2), [vectors(256, 2)], settings=["torch", "frozen_stats"],
                     steps=40, seeds=[0, 1, 2], optimizer=sgd(0.05, 0.9))
    torch_acc, frozen_stats_acc = (result.row(n).metric("val") for n in ("torch", "frozen_stats"))
    assert result.best == "frozen_stats", str(result)
    assert frozen_stats_acc - torch_acc > 0.1, str(result)
    assert result.row("torch").modes["train"] == "batch/ema"
    assert result.row("frozen_stats").modes == {"train": "running/none", "eval": "running/none", "affine": "learns"}


def test_the_same_seeds_give_the_same_table():
    x, y = images(64, 3, shifted=True)

    def run():
        return compare(source_cnn(), loader(x, y, 16), [images(64, 4, shifted=True)], steps=3, seeds=[0, 1],
                       optimizer=sgd(1e-2, 0.9))

    first, second = run(), run()
    assert without_timings(first.records()) == without_timings(second.records())
    assert first.suggestion == second.suggestion


def test_every_setting_sees_the_same_batches_in_the_same_order():
    """A shuffling DataLoader without a generator of its own: the same order for every setting of a seed."""
    seen: list[list[int]] = []

    def loss(output, target):
        seen[-1].append(int(target.sum()))
        return F.cross_entropy(output, target)

    def mark(model, data):  # a prepare step: a new row of targets starts here
        seen.append([])
        torch.rand(len(seen))  # and it draws from torch's generator, a different amount each time

    x, y = images(96, 3, shifted=True)
    settings = [Setting(name, name, prepare=mark) for name in ("torch", "frozen", "running_update")]
    for seed in (5, 6):
        compare(source_cnn(), loader(x, y, 8), [images(16, 4)], settings=settings, steps=6, loss=loss, seed=seed)
    assert len(seen) == 6 and all(len(order) == 6 + 1 for order in seen)  # 6 steps, one validation batch
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5]
    assert seen[0] != seen[3]  # another seed, another order


def test_the_original_model_and_torch_s_generator_are_left_as_they_were():
    model, train, val = small_setup()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    result = compare(model, train, val, steps=4, settings=[*DEFAULT_SETTINGS, "frozen+fold"])
    assert all(r.finished for r in result.rows), str(result)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(type(m) is nn.BatchNorm2d for m in (model[1], model[4]))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


# -- bad input, each named in its row ------------------------------------------------------------------------


def test_a_model_without_batchnorm_is_refused_before_any_work():
    with pytest.raises(ValueError, match="expected a model with BatchNorm layers.*LayerNorm or GroupNorm"):
        compare(nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)), [], [])


def test_bad_arguments_are_refused_before_any_work():
    model, train, val = small_setup()
    with pytest.raises(ValueError, match=r"PRESET one of \[.*'frozen_stats'.*Did you mean 'frozen_stats'\?"):
        compare(model, train, val, settings=["frozen_stat"])
    with pytest.raises(ValueError, match="expected a setting of the form"):
        compare(model, train, val, settings=["recalibrate+torch+frozen"])
    with pytest.raises(ValueError, match=r"unique setting names, got \['torch'\]"):
        compare(model, train, val, settings=["torch", "torch"])
    with pytest.raises(ValueError, match="steps to be an int >= 1"):
        compare(model, train, val, steps=0)
    with pytest.raises(ValueError, match="seeds to be a non-empty sequence"):
        compare(model, train, val, seeds=[])
    with pytest.raises(ValueError, match="metric=None ranks by validation loss"):
        compare(model, train, val, metric=None, higher_is_better=True)
    with pytest.raises(ValueError, match=r"validation sets \['source'\]"):
        compare(model, train, val, settings=[Setting("x", "torch", domain={"source": "target"})])


class Unpicklable(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.lock = threading.Lock()  # deepcopy cannot copy a lock

    def forward(self, x):
        return self.net(x)


def test_a_model_that_cannot_be_copied_is_refused_and_left_alone():
    model = Unpicklable()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="could not copy the model.*never changes your model"):
        compare(model, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], [], steps=2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert type(model.net[1]) is nn.BatchNorm1d


def explode(model, data):
    raise RuntimeError("boom")


def blow_up(model, data):
    with torch.no_grad():
        model[-1].weight.mul_(1e38)


def test_each_failure_is_named_in_its_row_and_the_others_run():
    model, train, val = small_setup(n=32)  # two batches
    settings = [
        Setting("short data", "torch"),
        Setting("diverges", "torch", prepare=blow_up),
        Setting("raises", "torch", prepare=explode),
        Setting("cycles", "frozen_stats"),
    ]
    result = compare(model, train, val, settings=settings[:3], steps=5)
    rows = {r.name: r for r in result.rows}
    assert rows["short data"].status == "data ended after 2 of 5 steps" and rows["short data"].finished
    assert rows["short data"].metric("val") is not None  # still evaluated (and ranked)
    assert rows["diverges"].status.startswith("diverged at step 1 (loss") and not rows["diverges"].finished
    assert rows["diverges"].metric("val") is None
    assert rows["raises"].status == "failed during prepare: RuntimeError: boom"
    assert result.best == "short data" and result.complete
    table = str(result)
    for row in result.rows:
        assert row.status in table
    cycled = compare(model, train, val, settings=settings[3:], steps=5, cycle=True)
    assert cycled.rows[0].status == "ok" and len(cycled.rows[0].runs[0].log.losses) == 5


def test_a_nan_metric_and_empty_validation_data_are_named():
    model, train, val = small_setup()
    result = compare(model, train, val, settings=["torch", "frozen"], steps=2, metric=lambda o, t: float("nan"))
    assert [r.status for r in result.rows] == ["metric is nan on 'val'"] * 2
    assert result.best is None and result.suggestion == "no setting finished: see the status column."
    empty = compare(model, train, {"val": []}, settings=["torch"], steps=2)
    assert empty.rows[0].status == "validation data 'val' is empty" and empty.best is None


def test_a_batch_of_another_form_names_forward():
    model, _train, _val = small_setup()
    result = compare(model, [torch.randn(8, 1, 8, 8)], [], settings=["torch"], steps=1)
    assert "failed during fine-tuning: TypeError: expected each batch to be an (input, target) pair" in (
        result.rows[0].status)
    assert "forward=lambda model, batch" in result.rows[0].status
    x, y = images(32, 3)
    dicts = [{"image": x[i : i + 16], "label": y[i : i + 16]} for i in (0, 16)]
    ok = compare(model, dicts, dicts, settings=["recalibrate+frozen_stats"], steps=2,
                 forward=lambda m, b: (m(b["image"]), b["label"]))
    assert ok.rows[0].status == "ok"


def test_ctrl_c_returns_the_rows_that_finished():
    model, train, val = small_setup()
    calls = {"n": 0}

    def loss(output, target):
        calls["n"] += 1
        if calls["n"] == 3 + 1 + 2:  # setting 1: 3 steps and 1 validation batch; then setting 2's 2nd step
            raise KeyboardInterrupt
        return F.cross_entropy(output, target)

    result = compare(model, train, val, steps=3, loss=loss)
    assert not result.complete and len(result.rows) == 2
    assert result.rows[0].finished and result.rows[0].status == "ok"
    assert result.rows[1].status == "interrupted at step 2" and not result.rows[1].finished
    assert result.best == "torch"
    assert "interrupted: 1 of 5 settings finished" in str(result)


# -- what is measured and how it is given back ---------------------------------------------------------------


def test_records_round_trip_through_json(tmp_path):
    model, train, val = small_setup()
    result = compare(model, train, {"target": val, "source": [images(32, 5)]}, steps=3, seeds=[0, 1],
                     settings=["torch", "frozen", "recalibrate+frozen_stats"])
    path = result.to_json(tmp_path / "results.json")
    data = json.loads((tmp_path / "results.json").read_text())
    assert path.endswith("results.json") and data["rows"] == result.records()
    assert data["best"] == result.best and data["suggestion"] == result.suggestion
    assert data["validation_sets"] == ["target", "source"] and data["seeds"] == [0, 1]
    record = data["rows"][0]
    assert record["setting"] == "torch" and record["policy"] == "torch" and record["seeds"] == [0, 1]
    assert len(record["train_loss"]) == 2 and len(record["train_loss"][0]) == 3
    assert set(record["metric"]) == {"target", "source"} and len(record["metric"]["source"]["per_seed"]) == 2
    assert record["memory_ratio"] == 1.0 and record["saved_bytes"] > 0
    assert [r["prepare"] for r in data["rows"]] == [None, None, "recalibrate"]
    assert {layer["name"] for layer in record["layers"]} == {"1", "4"}
    assert "target acc" in str(result) and "source acc" in str(result)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model, train, val = small_setup()
    result = compare(model, train, val, steps=3, settings=["torch", "frozen"])
    path = result.plot(tmp_path / "results.png")
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    model, train, val = small_setup()
    result = compare(model, train, val, steps=1, settings=["torch"])
    block_imports(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r"pip install 'bnctl\[demo\]'"):
        result.plot(tmp_path / "results.png")


def test_memory_is_measured_and_folding_saves_it():
    model, train, val = small_setup()
    result = compare(model, train, val, steps=2, settings=["torch", "frozen", "frozen_stats", "frozen_stats+fold"])
    saved = {r.name: r.saved_bytes for r in result.rows}
    assert saved["frozen"] < saved["torch"] and saved["frozen_stats+fold"] < saved["frozen_stats"]
    records = {r["setting"]: r for r in result.records()}
    assert records["torch"]["memory_ratio"] == 1.0 and records["frozen"]["memory_ratio"] < 1.0
    torch.testing.assert_close(records["frozen_stats+fold"]["val_loss"]["val"]["mean"],
                               records["frozen_stats"]["val_loss"]["val"]["mean"], rtol=1e-4, atol=1e-5)


def test_a_domain_setting_evaluates_in_its_domain():
    model, train, val = small_setup()

    def adabn(model, data):
        bnctl.add_domains(model, ["target"])
        bnctl.recalibrate(model, data, domain="target")

    settings = [Setting("adabn", prepare=adabn, steps=0, domain={"target": "target"}),
                Setting("as is", steps=0)]
    result = compare(model, train, {"target": val, "source": [images(64, 5)]}, settings=settings, steps=4)
    adapted, plain = result.row("adabn"), result.row("as is")
    assert adapted.metric("target") > plain.metric("target") + 0.2
    assert adapted.metric("source") == plain.metric("source")  # the source statistics were kept
    assert adapted.layers[0].stats == 0.0 and adapted.runs[0].log.losses == []


def test_metric_none_ranks_by_validation_loss_and_a_metric_may_be_lower_is_better():
    model, train, val = small_setup()
    by_loss = compare(model, train, val, steps=3, settings=["torch", "recalibrate+frozen_stats"], metric=None)
    losses = {r.name: r.val_loss("val") for r in by_loss.rows}
    assert by_loss.best == min(losses, key=losses.get) and by_loss.metric_name == "loss"
    assert "val loss" in str(by_loss) and not by_loss.higher_is_better

    def error_rate(output, target):
        return (output.argmax(1) != target).float().mean()

    lower = compare(model, train, val, steps=3, settings=["torch", "frozen", "recalibrate+frozen_stats"],
                    metric=error_rate, higher_is_better=False)
    rates = {r.name: r.metric("val") for r in lower.rows}
    assert lower.best == min(rates, key=rates.get) and "val error_rate" in str(lower)


def test_settings_in_every_form():
    assert as_setting(bnctl.Policy("running", "none", "running", "none", name="mine")).name == "mine"
    assert as_setting(bnctl.Policy("running", "none", "running", "none")).name == "custom"
    assert as_setting("frozen_stats+fold") == Setting("frozen_stats+fold", "frozen_stats", fold=True)
    assert as_setting("recalibrate").policy == "recalibrate" and as_setting("recalibrate").prepare is None
    assert isinstance(as_setting("recalibrate+frozen").prepare, Recalibrate)
    assert as_setting(lambda m, d: None, 2).name == "setting 3"
    assert as_setting(blow_up).name == "blow_up"
    with pytest.raises(TypeError, match="expected a setting"):
        as_setting(3)
    with pytest.raises(ValueError, match="steps to be None or an int >= 0"):
        Setting("x", steps=-1)


def test_progress_bar_counts_settings_times_steps_times_seeds(monkeypatch):
    totals = []

    class Bar:
        def __init__(self, total):
            totals.append(total)
            self.n = 0

        def update(self, k):
            self.n += k

        def set_description(self, text):
            pass

        def close(self):
            totals.append(self.n)

    monkeypatch.setattr(sys.modules["bnctl.compare"], "progress_bar", lambda total, desc, enabled: Bar(total))
    model, train, val = small_setup()
    compare(model, train, val, steps=3, seeds=[0, 1], settings=["torch", Setting("stats only", steps=0)])
    assert totals == [6, 6]


# -- the engine ----------------------------------------------------------------------------------------------


def test_fine_tune_stops_and_says_why():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    log = fine_tune(model, data, 7, cycle=True, optimizer=sgd(0.1))
    assert log.stopped is None and log.steps_done == 7 and len(log.step_seconds) == 7
    assert fine_tune(model, data, 7).stopped == "data ended after 3 of 7 steps"
    assert fine_tune(model, [], 3, cycle=True).stopped == "data ended after 0 of 3 steps"
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="expected parameters to train, got none"):
        fine_tune(model, data, 1)


def test_fine_tune_keeps_the_mode_it_is_given():
    """A hand-made setting (bn.eval() after model.train()) is measured as it is: the loop does not call train()."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    model[1].eval()
    before = batchnorm_tensors(model)
    fine_tune(model, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], 1)
    drift = batchnorm_drift(before, batchnorm_tensors(model))[0]
    assert drift.stats == 0.0 and drift.updates == 0 and drift.affine > 0


def test_count_saved_counts_each_storage_once_and_leaves_out_the_model():
    model = nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256, requires_grad=True)
    with count_saved(model) as saved:
        y = x * x  # saves x twice: one storage
        model(y)
    assert saved.activations == 2 * x.nelement() * 4  # x and y, once each
    assert saved.total == saved.activations + model.weight.nelement() * 4


def test_drift_is_zero_for_what_did_not_move_and_relative_otherwise():
    layer = nn.BatchNorm1d(3)
    before = batchnorm_tensors(layer)
    with torch.no_grad():
        layer.running_mean += 0.5  # half a standard deviation (running_var is 1)
        layer.weight.mul_(2.0)
    drift = batchnorm_drift(before, batchnorm_tensors(layer))
    assert [d.name for d in drift] == ["BatchNorm1d"] and drift[0].updates == 0
    assert drift[0].stats == pytest.approx(0.5) and drift[0].affine == pytest.approx(1.0)
    frozen = nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    assert batchnorm_drift(batchnorm_tensors(frozen), batchnorm_tensors(frozen))[0].stats is None
