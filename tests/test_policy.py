import dataclasses

import pytest

import bnctl
from bnctl import PRESETS, Mode, Policy, get_policy, resolve_mode
from bnctl.policy import Step, make_plan, make_step, needs_running_stats

# SPEC section 2, row by row: preset -> (train normalize/update, eval normalize/update, affine)
SPEC_TABLE = {
    "torch": (("batch", "ema"), ("running", "none"), None),
    "frozen": (("running", "none"), ("running", "none"), False),
    "frozen_stats": (("running", "none"), ("running", "none"), True),
    "running_update": (("running", "ema"), ("running", "none"), None),
    "batch_no_update": (("batch", "none"), ("running", "none"), None),
    "test_time": (("batch", "none"), ("batch", "none"), True),
    "recalibrate": (("batch", "cumulative"), ("batch", "cumulative"), False),
    "renorm": (("renorm", "ema"), ("running", "none"), None),
}


def test_presets_match_spec_table():
    assert set(PRESETS) == set(SPEC_TABLE)
    for name, (train, evaluation, affine) in SPEC_TABLE.items():
        p = PRESETS[name]
        assert p.mode(True) == Mode(*train), name
        assert p.mode(False) == Mode(*evaluation), name
        assert p.learn_affine is affine, name
        assert p.name == name


# resolve_mode's whole truth table, row by row, as SPEC section 2 and resolve_mode's docstring state it.
TRUTH_TABLE = """
    preset          buffers track mode   result
    torch           yes     yes   train  batch/ema
    torch           yes     yes   eval   running/none
    torch           yes     no    train  batch/none
    torch           yes     no    eval   running/none
    torch           no      yes   train  batch/none
    torch           no      yes   eval   batch/none
    torch           no      no    train  batch/none
    torch           no      no    eval   batch/none
    frozen          yes     yes   train  running/none
    frozen          yes     yes   eval   running/none
    frozen          yes     no    train  running/none
    frozen          yes     no    eval   running/none
    frozen          no      yes   train  batch/none
    frozen          no      yes   eval   batch/none
    frozen          no      no    train  batch/none
    frozen          no      no    eval   batch/none
    frozen_stats    yes     yes   train  running/none
    frozen_stats    yes     yes   eval   running/none
    frozen_stats    yes     no    train  running/none
    frozen_stats    yes     no    eval   running/none
    frozen_stats    no      yes   train  batch/none
    frozen_stats    no      yes   eval   batch/none
    frozen_stats    no      no    train  batch/none
    frozen_stats    no      no    eval   batch/none
    running_update  yes     yes   train  running/ema
    running_update  yes     yes   eval   running/none
    running_update  yes     no    train  running/none
    running_update  yes     no    eval   running/none
    running_update  no      yes   train  batch/none
    running_update  no      yes   eval   batch/none
    running_update  no      no    train  batch/none
    running_update  no      no    eval   batch/none
    batch_no_update yes     yes   train  batch/none
    batch_no_update yes     yes   eval   running/none
    batch_no_update yes     no    train  batch/none
    batch_no_update yes     no    eval   running/none
    batch_no_update no      yes   train  batch/none
    batch_no_update no      yes   eval   batch/none
    batch_no_update no      no    train  batch/none
    batch_no_update no      no    eval   batch/none
    test_time       yes     yes   train  batch/none
    test_time       yes     yes   eval   batch/none
    test_time       yes     no    train  batch/none
    test_time       yes     no    eval   batch/none
    test_time       no      yes   train  batch/none
    test_time       no      yes   eval   batch/none
    test_time       no      no    train  batch/none
    test_time       no      no    eval   batch/none
    recalibrate     yes     yes   train  batch/cumulative
    recalibrate     yes     yes   eval   batch/cumulative
    recalibrate     yes     no    train  batch/none
    recalibrate     yes     no    eval   batch/none
    recalibrate     no      yes   train  batch/none
    recalibrate     no      yes   eval   batch/none
    recalibrate     no      no    train  batch/none
    recalibrate     no      no    eval   batch/none
    renorm          yes     yes   train  renorm/ema
    renorm          yes     yes   eval   running/none
    renorm          yes     no    train  renorm/none
    renorm          yes     no    eval   running/none
    renorm          no      yes   train  batch/none
    renorm          no      yes   eval   batch/none
    renorm          no      no    train  batch/none
    renorm          no      no    eval   batch/none
"""
ROWS = [line.split() for line in TRUTH_TABLE.strip().splitlines()[1:]]


@pytest.mark.parametrize("preset,buffers,track,training,result", ROWS, ids=[" ".join(r[:4]) for r in ROWS])
def test_resolve_mode_truth_table(preset, buffers, track, training, result):
    normalize, update = result.split("/")
    got = resolve_mode(PRESETS[preset], training == "train", track == "yes", buffers == "yes")
    assert got == Mode(normalize, update)


def test_truth_table_covers_every_preset_and_case():
    assert {(r[0], r[1], r[2], r[3]) for r in ROWS} == {
        (p, b, t, m) for p in PRESETS for b in ("yes", "no") for t in ("yes", "no") for m in ("train", "eval")
    }


@pytest.mark.parametrize(
    "has_stats,track,training,expected",
    [
        (True, True, True, ("batch", "ema")),
        (True, True, False, ("running", "none")),
        (True, False, True, ("batch", "none")),
        (True, False, False, ("running", "none")),
        (False, False, True, ("batch", "none")),
        (False, False, False, ("batch", "none")),
    ],
)
def test_torch_preset_is_pytorchs_logic(has_stats, track, training, expected):
    assert resolve_mode(PRESETS["torch"], training, track, has_stats) == Mode(*expected)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="frozen_stats"):
        get_policy("freeze")
    with pytest.raises(TypeError):
        get_policy(3)


@pytest.mark.parametrize(
    "field,value",
    [
        ("train_normalize", "batches"),
        ("train_normalize", 1.5),
        ("eval_normalize", -0.1),
        ("train_normalize", True),
        ("train_update", "exponential"),
        ("eval_update", None),
        ("learn_affine", "yes"),
        ("momentum", 0.99 + 0.02),
        ("momentum", -0.1),
        ("rmax", 0.5),
        ("dmax", -1.0),
        ("renorm_warmup", (10, 5)),
        ("renorm_warmup", [0, 1]),
    ],
)
def test_bad_values_raise_value_error(field, value):
    with pytest.raises(ValueError, match=f"Policy.{field}"):
        Policy(**{field: value})


def test_policy_is_frozen_and_replace_validates():
    p = PRESETS["frozen"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train_update = "ema"
    q = dataclasses.replace(p, eval_normalize=0.3)
    assert q.mode(False) == Mode(0.3, "none")
    with pytest.raises(ValueError):
        dataclasses.replace(p, eval_normalize=3.0)


def test_momentum_converters():
    assert bnctl.momentum_from_decay(0.99) == pytest.approx(0.01)
    assert bnctl.momentum_from_decay(0.9) == pytest.approx(0.1)
    m = bnctl.momentum_from_half_life(10)
    assert (1 - m) ** 10 == pytest.approx(0.5)
    for bad in (0, -1, float("inf")):
        with pytest.raises(ValueError):
            bnctl.momentum_from_half_life(bad)
    with pytest.raises(ValueError):
        bnctl.momentum_from_decay(1.5)


def test_keras_style_momentum_is_rejected_with_hint():
    with pytest.raises(ValueError, match="momentum_from_decay"):
        Policy(momentum=1.01)


def test_needs_running_stats():
    assert [n for n, p in PRESETS.items() if needs_running_stats(p)] == [
        "frozen", "frozen_stats", "running_update", "recalibrate", "renorm"]
    assert not needs_running_stats(Policy("batch", "none", "batch", "none"))
    assert needs_running_stats(Policy("batch", "none", 0.5, "none"))  # a blend reads the buffers
    assert needs_running_stats(Policy("batch", "cumulative", "running", "none"))


def test_plan_resolves_once_for_a_layer():
    plan = make_plan(PRESETS["renorm"], momentum=0.3, track_running_stats=True, has_running_stats=True)
    assert plan[True] == Step("renorm", "ema", 0.3, False, (3.0, 5.0, (5000, 40000)))
    assert plan[False] == Step("running", "none", 0.3, False, None) and plan[False] is plan.eval
    override = make_plan(Policy(momentum=0.01), momentum=0.3, track_running_stats=True, has_running_stats=True)
    assert override.train.momentum == 0.01
    untracked = make_plan(PRESETS["torch"], momentum=0.1, track_running_stats=False, has_running_stats=True)
    assert untracked.train[:2] == ("batch", "none")


@pytest.mark.parametrize("alpha,expected", [(1.0, "batch"), (0.0, "running"), (0.25, 0.25), (1, "batch")])
def test_blend_end_points_are_the_plain_modes(alpha, expected):
    assert make_step(Mode(alpha, "none"), 0.1).normalize == expected


def test_a_modified_preset_does_not_display_as_the_preset():
    p = dataclasses.replace(get_policy("running_update"), momentum=1e-3)
    assert p.label == "running_update(momentum=0.001)" and str(p).startswith("running_update(momentum=0.001) ")
    assert get_policy("running_update").label == "running_update"
    assert Policy().label == "custom" and Policy(name="mine").label == "mine"


def test_momentum_none_means_what_it_means_in_torch():
    """None is a cumulative average; the layer's own momentum is the default, "layer"."""
    assert Policy().momentum == "layer"
    plan = make_plan(dataclasses.replace(get_policy("torch"), momentum=None), momentum=0.1,
                     track_running_stats=True, has_running_stats=True)
    assert plan.train.momentum is None
    with pytest.raises(ValueError, match="'layer'"):
        Policy(momentum="model")
