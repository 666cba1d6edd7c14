import math

from server_app.federation import passes_quality_gate


def test_a_better_or_equal_version_passes():
    assert passes_quality_gate(2.0, 2.5, margin=0.1)
    assert passes_quality_gate(2.5, 2.5, margin=0.0)


def test_a_version_worse_within_the_margin_passes():
    assert passes_quality_gate(2.55, 2.5, margin=0.1)


def test_a_version_worse_beyond_the_margin_is_not_promoted():
    assert not passes_quality_gate(2.7, 2.5, margin=0.1)


def test_a_non_finite_loss_never_passes():
    assert not passes_quality_gate(math.nan, 2.5, margin=0.1)
    assert not passes_quality_gate(math.inf, 2.5, margin=0.1)


def test_a_negative_margin_turns_the_gate_off_and_a_first_version_always_passes():
    assert passes_quality_gate(9.0, 2.5, margin=-1.0)
    assert passes_quality_gate(9.0, None, margin=0.1)
