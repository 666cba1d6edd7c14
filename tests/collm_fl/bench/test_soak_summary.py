"""The soak report's memory verdict: per process and per load phase, RSS at the end and slope."""

import pytest

from collm_fl.bench.soak import _rss_summary


def samples(name, rss_of_t, until=120.0, every=2.0):
    n = int(until / every)
    return [(k * every, name, rss_of_t(k * every)) for k in range(n + 1)]


def test_a_steady_leak_shows_in_every_phase_and_a_high_water_mark_only_where_load_rose():
    bounds = [(0.0, 40.0), (40.0, 80.0), (80.0, 120.0)]  # 1×, 2×, 1×
    leaking = samples("leaky", lambda t: 100.0 + 0.5 * t)  # +30 MiB/min, always

    def high_water(t):  # grows early in the 2× phase, then stays
        return 100.0 + (min(max(t - 40.0, 0.0), 10.0) * 2.0)

    flat = samples("flat", high_water)
    out = _rss_summary(leaking + flat, bounds)
    assert [p["slope_mib_per_min"] for p in out["leaky"]["phases"]] == pytest.approx([30.0] * 3)
    assert [p["slope_mib_per_min"] for p in out["flat"]["phases"]] == pytest.approx([0.0] * 3)
    assert [p["end_mib"] for p in out["flat"]["phases"]] == pytest.approx([100.0, 120.0, 120.0])
    assert out["flat"]["first_mib"] == 100.0 and out["flat"]["peak_mib"] == 120.0
    assert out["leaky"]["last_mib"] == pytest.approx(160.0)


def test_a_phase_with_too_few_samples_has_no_slope():
    out = _rss_summary(samples("p", lambda t: t, until=4.0), [(0.0, 4.0)])
    assert out["p"]["phases"][0]["slope_mib_per_min"] == 0.0
