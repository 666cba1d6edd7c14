import math
from datetime import UTC, datetime

from collm_fl.store import VersionInfo
from server_app.federation import gate_reference, passes_quality_gate


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


def _version(number: int, loss: float | None) -> VersionInfo:
    return VersionInfo(
        number, 1, number, number, f"v{number}", "", datetime.now(UTC), {}, loss, None
    )


def test_small_regressions_cannot_add_up_past_the_margin():
    drifted = [_version(0, 2.0), _version(1, 2.09)]  # v1 passed: within 0.1 of v0
    best = gate_reference(drifted)
    assert best is not None and best.number == 0
    assert passes_quality_gate(2.18, 2.09, margin=0.1)  # against the served v1 it would pass
    assert not passes_quality_gate(2.18, best.eval_loss, margin=0.1)


def test_without_a_scored_version_there_is_nothing_to_hold_against():
    assert gate_reference([]) is None
    assert gate_reference([_version(0, None)]) is None
