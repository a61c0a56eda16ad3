"""The command line: bnctl demo (small scale), bnctl inspect, errors and exit codes."""

import json
import re

import pytest
import torch
from torch import nn

from bnctl.cli import main
from conftest import block_imports, trained_state


def test_help_and_usage_errors(capsys):
    assert main(["--help"]) == 0
    assert "bnctl inspect model.pt" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_inspect_clean_checkpoint(tmp_path, capsys):
    path = tmp_path / "ok.pt"
    torch.save(trained_state(), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 BatchNorm layer(s), 0 with problems" in out


def test_inspect_flags_problems_and_json(tmp_path, capsys):
    state = trained_state()
    state["1.running_var"][0] = float("nan")
    state["1.weight"][1] = 0.0
    fresh = nn.BatchNorm1d(3).state_dict()
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}
    wrapped["state_dict"].update({"module.extra." + k: v for k, v in fresh.items()})
    path = tmp_path / "bad.pt"
    torch.save(wrapped, path)
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "non-finite values in running_var" in out and "near-zero weight" in out
    assert "extra" in out and "never updated" in out
    assert main(["inspect", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert {layer["name"] for layer in data["layers"]} == {"1", "4", "extra"}
    assert data["problems"] == 3


def test_inspect_refuses_pickled_model_without_running_it(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.BatchNorm1d(3)), path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights_only=True" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_inspect_corrupt_file(tmp_path, capsys, content):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnctl: error:") and err.count("\n") == 1


@pytest.mark.parametrize("obj, found", [(torch.zeros(3), "found a Tensor"), ({}, "found an empty dict"),
                                        ({"epoch": 3}, "found a dict without tensors (keys 'epoch')")])
def test_inspect_non_state_dict(tmp_path, capsys, obj, found):
    path = tmp_path / "obj.pt"
    torch.save(obj, path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "expected a state dict" in err and found in err and "Save model.state_dict()" in err


def test_demo_small_scale_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--seeds", "1", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Part A" in text and "preset frozen_stats" in text and "AdaBN (target domain)" in text
    data = json.loads((out / "results.json").read_text())
    assert len(data["part_a"]) == 10
    assert set(data["part_b"]) == {"inverted", "low_contrast", "noise", "blur"}
    accs = [a for t in data["part_b"].values() for m in t.values() for a in m["target"]]
    assert all(0.0 <= a <= 1.0 for a in accs)
    rows = {r["setting"]: r for r in data["part_a"]}
    assert rows["bn.eval()"]["survives model.train()"] == "no"
    assert rows["preset frozen"]["running stats changed"] == "no"
    assert rows["train()+momentum=0+no grad"]["normalizes with"] == "batch"
    assert re.search(r"survives model\.train\(\)\s+a trainer loop's model\.train\(\) leaves the setting", text)
    assert "renorm measures as 'batch': during Batch Renormalization's warm-up" in text
    if (out / "results.png").exists():
        png = (out / "results.png").read_bytes()
        assert png[:4] == b"\x89PNG"
        assert int.from_bytes(png[16:20], "big") > 1600  # two panels: target and source accuracy


def test_demo_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    block_imports(monkeypatch, "matplotlib")
    assert main(["demo", "--quick", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "no plot: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "results.png").exists()


def test_demo_without_sklearn_is_a_clear_error(capsys, monkeypatch):
    block_imports(monkeypatch, "sklearn")
    assert main(["demo", "--quick", "--no-progress"]) == 2
    assert "pip install 'bnctl[demo]'" in capsys.readouterr().err


class _Payload:
    """Unpickling this would create a file: proof that inspect never runs code from a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_inspect_never_executes_code_from_the_file(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)
    assert not marker.exists()
    assert main(["inspect", str(path)]) == 2
    assert not marker.exists()
    assert "weights_only=True" in capsys.readouterr().err


def run_inspect(path, capsys):
    code = main(["inspect", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_fuzzed_files_exit_2_with_one_line(tmp_path, capsys):
    """Random bytes, truncations and byte flips of a real checkpoint: never a traceback."""
    import io
    import random

    buf = io.BytesIO()
    torch.save(trained_state(), buf)
    real = buf.getvalue()
    rng = random.Random(0)
    cases = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 600))) for _ in range(40)]
    cases += [real[: rng.randrange(len(real))] for _ in range(80)]
    for _ in range(180):
        flipped = bytearray(real)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.getrandbits(8)
        cases.append(bytes(flipped))
    path = tmp_path / "fuzz.pt"
    codes = []
    for content in cases:
        path.write_bytes(content)
        code, _out, err = run_inspect(path, capsys)
        codes.append(code)
        assert code in (0, 1, 2)
        if code == 2:
            assert err.startswith("bnctl: error:") and err.count("\n") == 1, err
    assert codes.count(2) > 100  # most of them are unreadable, as they should be


def test_inspect_odd_tensors_are_problems(tmp_path, capsys):
    state = trained_state()
    state["1.running_mean"] = torch.zeros(2, 2)
    state["4.num_batches_tracked"] = torch.tensor(float("nan"))
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    code, out, _err = run_inspect(path, capsys)
    assert code == 1 and "expected a 1-D floating-point tensor" in out and "expected a count" in out


def test_demo_checks_its_output_folder_first(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert main(["demo", "--quick", "--seeds", "1", "--out", str(blocker / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1


def test_report_says_what_to_do_per_layer_and_domain(tmp_path, capsys):
    state = trained_state()
    state["1.running_var"][0] = float("nan")
    state.update({"extra." + k: v for k, v in nn.BatchNorm1d(3).state_dict().items()})
    state.update({f"4.{k}__target": state[f"4.{k}"].clone() for k in ("running_mean", "running_var",
                                                                      "num_batches_tracked")})
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    assert main(["report", str(path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^layer\s+domain\s+affine\s+batches$", out, re.M)
    assert re.search(r"^4\s+target\s+yes\s+1$", out, re.M)
    assert "! 1: non-finite values in running_var (1 channel): " in out and "bnctl.recalibrate(model, loader)" in out
    assert "! extra: statistics never updated (all 0 and 1): load the pretrained statistics" in out
    assert main(["report", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["problems"] == 2 and {(r["name"], r["domain"]) for r in data["layers"]} == {
        ("1", "default"), ("4", "default"), ("4", "target"), ("extra", "default")}
    clean = tmp_path / "ok.pt"
    torch.save(trained_state(), clean)
    assert main(["report", str(clean)]) == 0
    assert "0 warning(s)" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_report_unreadable_file_is_one_line_and_status_2(tmp_path, capsys, content):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    assert main(["report", str(path)]) == 2
    assert main(["report", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnctl: error:") and err.count("\n") == 2 and "Traceback" not in err


@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--json"], ["report"], ["report", "--json"]])
def test_a_closed_pipe_ends_quietly_with_the_command_s_status(tmp_path, command):
    import subprocess
    import sys

    state = {f"{i}.{k}": v for i in range(200) for k, v in trained_state().items() if k.startswith("1.")}
    state["0.1.running_var"][0] = float("nan")  # one problem: status 1
    path = tmp_path / "many.pt"
    torch.save(state, path)
    proc = subprocess.Popen([sys.executable, "-m", "bnctl", *command[:1], str(path), *command[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line (as `| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


# -- bnctl compare ----------------------------------------------------------------------------------------------

MODELS = '''
import torch
from torch import nn


def pretrained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 2 + 1)
    return model


def no_batchnorm():
    return nn.Linear(4, 2)


def not_a_model():
    return "a string"


def broken():
    raise OSError("weights not found")


def loaders():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 1, 8, 8, generator=g), torch.randint(0, 3, (80,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)], [(x[48:], y[48:])]


def one_loader():
    return loaders()[0]


def no_validation():
    return loaders()[0], []
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``usermodels`` in the current folder, as a user's would be; sys.path and sys.modules restored."""
    import sys

    (tmp_path / "usermodels.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "usermodels", raising=False)
    yield tmp_path
    sys.modules.pop("usermodels", None)


def test_compare_prints_the_table_and_writes_json_and_plot(user_module, capsys):
    out = user_module / "out"
    code = main(["compare", "--model", "usermodels:pretrained", "--data", "usermodels:loaders", "--steps", "3",
                 "--settings", "torch,frozen,recalibrate+frozen_stats,frozen+fold", "--seeds", "0,1",
                 "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert re.search(r"^\s+setting\s+train\(\)\s+val acc", text, re.M) and "suggestion: " in text
    assert re.search(r"^[* ] frozen\+fold\s+running/none", text, re.M)
    data = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in data["rows"]] == ["torch", "frozen", "recalibrate+frozen_stats", "frozen+fold"]
    assert data["seeds"] == [0, 1] and data["steps"] == 3 and data["best"] in text
    assert f"wrote {out / 'results.json'}" in text
    if (out / "results.png").exists():
        assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "no plot" in text


def test_compare_without_matplotlib_still_writes_json(user_module, capsys, monkeypatch):
    block_imports(monkeypatch, "matplotlib")
    code = main(["compare", "--model", "usermodels:pretrained", "--data", "usermodels:loaders", "--steps", "2",
                 "--settings", "torch", "--optimizer", "adam", "--lr", "1e-3", "--cycle", "--out", "o",
                 "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0 and "no plot: matplotlib is not installed (pip install 'bnctl[demo]')" in text
    assert (user_module / "o" / "results.json").exists() and not (user_module / "o" / "results.png").exists()


def test_compare_exits_1_when_no_setting_finished(user_module, capsys):
    code = main(["compare", "--model", "usermodels:pretrained", "--data", "usermodels:no_validation", "--steps", "2",
                 "--settings", "torch,frozen", "--no-progress", "--out", "o"])
    text = capsys.readouterr().out
    assert code == 1 and "validation data 'val' is empty" in text and "no setting finished" in text


@pytest.mark.parametrize("args, message", [
    (["--model", "usermodels", "--data", "usermodels:loaders"], "--model: expected MOD:NAME"),
    (["--model", "nosuchmodule:f", "--data", "usermodels:loaders"], "--model: could not import 'nosuchmodule'"),
    (["--model", "usermodels:resnet", "--data", "usermodels:loaders"], "has no 'resnet'; its functions"),
    (["--model", "usermodels:not_a_model", "--data", "usermodels:loaders"], "to return a torch.nn.Module, got str"),
    (["--model", "usermodels:broken", "--data", "usermodels:loaders"], "raised OSError: weights not found"),
    (["--model", "usermodels:pretrained", "--data", "usermodels:one_loader"], "a pair (train, val)"),
    (["--model", "usermodels:no_batchnorm", "--data", "usermodels:loaders"], "expected a model with BatchNorm"),
    (["--model", "usermodels:pretrained", "--data", "usermodels:loaders", "--settings", "torch,frozn"],
     "Did you mean 'frozen'?"),
    (["--model", "usermodels:pretrained", "--data", "usermodels:loaders", "--seeds", "0,x"], "--seeds: expected"),
    (["--model", "usermodels:pretrained", "--data", "usermodels:loaders", "--steps", "0"], "--steps: expected"),
    (["--model", "usermodels:pretrained", "--data", "usermodels:loaders", "--out", "usermodels.py/out"], "--out:"),
])
def test_compare_errors_are_one_line_and_status_2(user_module, capsys, args, message):
    assert main(["compare", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnctl: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err


def test_compare_help_names_the_forms(capsys):
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "MOD:FACTORY" in out and "[recalibrate+]PRESET[+fold]" in out
    assert main(["--help"]) == 0 and "bnctl compare --model" in capsys.readouterr().out
