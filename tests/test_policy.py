import dataclasses

import pytest

import bnctl
from bnctl import PRESETS, Mode, Policy, get_policy, resolve_mode

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


# The full truth table of resolve_mode, for every preset:
# (has_running_stats, track_running_stats, training) -> expected
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("has_stats", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_resolve_mode_truth_table(preset, has_stats, track, training):
    policy = PRESETS[preset]
    train, evaluation, _ = SPEC_TABLE[preset]
    half = Mode(*(train if training else evaluation))
    got = resolve_mode(policy, training, track, has_stats)
    if not has_stats:
        assert got == Mode("batch", "none")
    elif not track:
        assert got == Mode(half.normalize, "none")
    else:
        assert got == half


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
