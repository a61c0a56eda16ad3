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


def test_readme_says_running_update_trains_less_stably_and_shows_it_measured():
    readme = (ROOT / "README.md").read_text()
    assert "**`running_update` trains less stably than `torch`.**" in readme
    assert "benchmarks/running_update_stability.py" in readme and "running_update                     0.01" in readme
    assert (ROOT / "benchmarks" / "running_update_stability.py").exists()


def test_the_test_command_shows_skip_reasons():
    assert "-rs" in (ROOT / "pyproject.toml").read_text().split("addopts")[1].splitlines()[0]
