"""Arrival processes: mean rate, burstiness, phase, determinism and parameter validation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from collm_fl.errors import ConfigError
from collm_fl.loadgen.arrivals import ARRIVAL_KINDS, arrival_times

RATE, DURATION = 20.0, 500.0


def _dispersion(times: np.ndarray, duration: float, window: float = 1.0) -> float:
    """Variance over mean of the per-window counts (1 for a Poisson process)."""
    counts, _ = np.histogram(times, bins=np.arange(0.0, duration + window, window))
    return float(counts.var() / counts.mean())


@pytest.mark.parametrize("kind", ARRIVAL_KINDS)
def test_every_kind_has_the_requested_mean_rate(kind: str) -> None:
    times = arrival_times(kind, RATE, DURATION, seed=1)
    assert abs(len(times) / DURATION - RATE) / RATE < 0.10


@pytest.mark.parametrize("kind", ARRIVAL_KINDS)
def test_offsets_are_sorted_and_inside_the_duration(kind: str) -> None:
    times = arrival_times(kind, RATE, 30.0, seed=2)
    assert np.all(np.diff(times) >= 0)
    assert times.min() >= 0 and times.max() < 30.0


@pytest.mark.parametrize("kind", ARRIVAL_KINDS)
def test_the_same_seed_gives_the_same_schedule(kind: str) -> None:
    a = arrival_times(kind, RATE, 50.0, seed=3)
    assert np.array_equal(a, arrival_times(kind, RATE, 50.0, seed=3))
    assert not np.array_equal(a, arrival_times(kind, RATE, 50.0, seed=4))


def test_poisson_gaps_have_unit_coefficient_of_variation() -> None:
    gaps = np.diff(arrival_times("poisson", RATE, DURATION, seed=5))
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


def test_bursty_arrivals_vary_more_than_poisson() -> None:
    poisson = arrival_times("poisson", RATE, DURATION, seed=6)
    bursty = arrival_times("bursty", RATE, DURATION, seed=6)
    gaps = np.diff(bursty)
    assert gaps.std() / gaps.mean() == pytest.approx(4.0, rel=0.2)  # the default cv
    assert _dispersion(bursty, DURATION) > 4 * _dispersion(poisson, DURATION)


def test_bursty_cv_controls_the_burstiness() -> None:
    mild = np.diff(arrival_times("bursty", RATE, DURATION, seed=7, cv=1.5))
    assert mild.std() / mild.mean() == pytest.approx(1.5, rel=0.1)


def test_onoff_sends_nothing_while_off() -> None:
    times = arrival_times("onoff", RATE, 100.0, seed=8, on_s=2.0, off_s=3.0)
    assert np.all(np.mod(times, 5.0) < 2.0)
    on_rate = len(times) / (20 * 2.0)  # 20 cycles of 2 s on
    assert on_rate == pytest.approx(RATE * 5.0 / 2.0, rel=0.1)  # rate / duty


@pytest.mark.parametrize("duration", [10.0, 30.0, 50.0, 60.0])
def test_onoff_offers_the_rate_over_a_duration_of_partial_cycles_too(duration: float) -> None:
    """A last partial cycle starts with its on period: at rate / duty the default 5/15-s
    cycles offered 2x the rate over 10 s."""
    counts = [len(arrival_times("onoff", 1.0, duration, seed=s)) for s in range(300)]
    assert np.mean(counts) / duration == pytest.approx(1.0, rel=0.05)


def test_diurnal_rate_follows_the_sine_phase() -> None:
    times = arrival_times("diurnal", RATE, 400.0, seed=9, period_s=100.0, amplitude=0.8)
    phase = np.mod(times, 100.0)
    rising, falling = np.sum(phase < 50.0), np.sum(phase >= 50.0)
    # Expected ratio (1 + 2A/π) / (1 − 2A/π) ≈ 3.07 for A = 0.8.
    expected = (1 + 2 * 0.8 / math.pi) / (1 - 2 * 0.8 / math.pi)
    assert rising / falling == pytest.approx(expected, rel=0.15)


def test_diurnal_without_amplitude_is_flat() -> None:
    times = arrival_times("diurnal", RATE, DURATION, seed=10, amplitude=0.0)
    assert _dispersion(times, DURATION) == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize(
    ("kind", "rate", "duration", "shape", "param"),
    [
        ("uniform", 1.0, 10.0, {}, "kind"),
        ("poisson", 0.0, 10.0, {}, "rate"),
        ("poisson", math.nan, 10.0, {}, "rate"),
        ("poisson", 1.0, -1.0, {}, "duration_s"),
        ("poisson", 1.0, 10.0, {"cv": 2.0}, "cv"),
        ("bursty", 1.0, 10.0, {"cv": 0.0}, "cv"),
        ("bursty", 1.0, 10.0, {"on_s": 1.0}, "on_s"),
        ("onoff", 1.0, 10.0, {"on_s": 0.0}, "on_s"),
        ("onoff", 1.0, 10.0, {"off_s": -1.0}, "off_s"),
        ("diurnal", 1.0, 10.0, {"amplitude": 1.5}, "amplitude"),
        ("diurnal", 1.0, 10.0, {"period_s": 0.0}, "period_s"),
        ("poisson", 1e6, 1e6, {}, "rate * duration_s"),
    ],
)
def test_invalid_parameters_are_config_errors_naming_the_parameter(
    kind: str, rate: float, duration: float, shape: dict[str, float], param: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(param)}"):
        arrival_times(kind, rate, duration, seed=0, **shape)


def test_bursty_arrivals_offer_the_rate_from_the_first_second():
    # Started in its steady state: no burst at t = 0 and, over many seeds, rate × duration
    # requests on average (a fresh gap at t = 0 gave (CV² − 1)/2 = 7.5 extra at CV 4).
    counts = [len(arrival_times("bursty", 1.0, 60.0, seed)) for seed in range(3000)]
    assert abs(sum(counts) / len(counts) - 60.0) < 2.5  # the mean's std error is 0.55
    starts = [arrival_times("bursty", 1.0, 60.0, seed)[:1] for seed in range(3000)]
    early = sum(1 for s in starts if len(s) and s[0] < 0.01)
    assert early < 0.05 * len(starts)  # was 64 % within 10 ms
