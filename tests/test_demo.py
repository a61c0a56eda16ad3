"""bnctl.demo internals that need no extra packages: Part A's measurements, the shifts."""

import runpy
from pathlib import Path

import torch

from bnctl.demo import SHIFTS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# What each setting must do; every cell is measured by the example (and by the demo).
EXPECTED = {
    "bn.eval()": ("running", "no", "no", "yes", "yes", "no"),
    "train()+momentum=0+no grad": ("batch", "no", "yes", "no", "no", "yes"),
    "preset torch": ("batch", "yes", "yes", "yes", "no", "yes"),
    "preset frozen": ("running", "no", "no", "no", "yes", "yes"),
    "preset frozen_stats": ("running", "no", "no", "yes", "yes", "yes"),
    "preset running_update": ("running", "yes", "yes", "yes", "yes", "yes"),
    "preset batch_no_update": ("batch", "no", "no", "yes", "no", "yes"),
    "preset test_time": ("batch", "no", "no", "yes", "yes", "yes"),
    "preset recalibrate": ("batch", "yes", "yes", "no", "yes", "yes"),
}


def test_part_a_measurements_on_the_forum_example(capsys):
    runpy.run_path(str(EXAMPLES / "forum_settings.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    for setting, cells in EXPECTED.items():
        row = next(line for line in lines if line.startswith(setting + " "))
        assert row[len(setting):].split() == list(cells), setting


def test_shifts_are_deterministic_and_documented():
    x = torch.rand(5, 1, 8, 8)
    for name, (description, fn) in SHIFTS.items():
        assert description
        a, b = fn(x, 3), fn(x, 3)
        assert torch.equal(a, b), name
        assert a.shape == x.shape and not torch.equal(a, x), name


ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_say_running_update_trains_less_stably_and_show_it_measured():
    page = (ROOT / "docs" / "how-to" / "normalize-with-running-stats.md").read_text()
    assert "## It trains less stably than `torch`" in page
    assert "benchmarks/running_update_stability.py" in page and "running_update                     0.01" in page
    assert (ROOT / "benchmarks" / "running_update_stability.py").exists()


def test_the_test_command_shows_skip_reasons():
    assert "-rs" in (ROOT / "pyproject.toml").read_text().split("addopts")[1].splitlines()[0]


# -- one engine: the demo runs on bnctl.compare ---------------------------------------------------------------


def test_part_a_steps_run_through_the_engine(monkeypatch):
    import bnctl.demo as demo

    calls = []
    real = demo.fine_tune
    monkeypatch.setattr(demo, "fine_tune", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    runpy.run_path(str(EXAMPLES / "forum_settings.py"), run_name="__main__")
    assert calls == [3] * len(demo.PART_A_SETTINGS)  # three SGD steps per setting, all by the engine


def test_part_b_is_one_compare_per_target_and_its_rows(monkeypatch):
    import bnctl.demo as demo

    results = []
    real = demo.compare
    monkeypatch.setattr(demo, "compare", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 10
    x = (torch.rand(200, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1) / 10).clamp(0, 1)
    cfg = demo.Config(seeds=1, source_epochs=1, finetune_steps=2, shots=2)
    out = demo.part_b_seed(x, y, 0, cfg)
    assert len(results) == len(SHIFTS) and all(r.complete for r in results)
    methods = [s.name for s in demo.part_b_settings(cfg, x[:10])]
    assert [r.name for r in results[0].rows] == methods and list(out["blur"]) == methods
    for target, result in zip(SHIFTS, results):
        assert result.val_names == ["target", "source"]
        for row in result.rows:
            assert out[target][row.name] == {"target": row.metric("target"), "source": row.metric("source")}
            assert len(row.runs[0].log.losses) == (2 if row.name.startswith("fine-tune") else 0)
    adabn = results[0].row("AdaBN (target domain)")
    assert adabn.metric("source") == results[0].row("source model as is").metric("source")  # source stats kept
