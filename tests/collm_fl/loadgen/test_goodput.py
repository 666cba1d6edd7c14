"""Goodput, SLO attainment and percentiles on hand-made results; served-quality helpers."""

from __future__ import annotations

import numpy as np
import pytest

from collm_fl.errors import ConfigError
from collm_fl.loadgen.client import RequestResult
from collm_fl.loadgen.goodput import (
    SLOSpec,
    meets_slo,
    served_quality_at,
    slo_from_unloaded,
    summarize_results,
    time_to_quality,
)

SLO = SLOSpec(ttft_s=0.5, tpot_s=0.1)


def _ok(i: int, ttft: float, tpot: float | None, out: int, version: int | None) -> RequestResult:
    e2e = ttft + (tpot or 0.0) * (out - 1)
    return RequestResult(i, float(i), ttft, tpot, e2e, "ok", 200, version, 20, out, None)


def _failed(i: int, status: str, http: int | None, ttft: float | None = None) -> RequestResult:
    return RequestResult(i, float(i), ttft, None, 1.0, status, http, None, 20, 0, status)


RESULTS = [
    _ok(0, 0.1, 0.05, 10, 3),  # meets both
    _ok(1, 0.2, 0.08, 10, 3),  # meets both
    _ok(2, 0.5, 0.1, 10, 4),  # meets both (at the bound)
    _ok(3, 0.6, 0.05, 10, 4),  # misses TTFT
    _ok(4, 0.3, 0.2, 10, None),  # misses TPOT
    _ok(5, 0.25, None, 1, None),  # one token: only TTFT is judged → meets
    _failed(6, "http_503", 503),
    _failed(7, "timeout", 200, ttft=0.1),  # a fast first token does not save a timeout
    _failed(8, "error", None),
    _failed(9, "dropped", None),
]


def test_summary_counts_goodput_attainment_and_errors_exactly() -> None:
    s = summarize_results(RESULTS, SLO, duration_s=5.0)
    assert (s.requests, s.ok, s.slo_met) == (10, 6, 4)
    assert s.errors == {"dropped": 1, "error": 1, "http_503": 1, "timeout": 1}
    assert s.slo_attainment == pytest.approx(0.4)  # over all 10, failures are misses
    assert s.goodput_rps == pytest.approx(4 / 5.0)
    assert s.throughput_rps == pytest.approx(6 / 5.0)
    assert s.output_tokens_per_s == pytest.approx(51 / 5.0)
    assert s.adapter_versions == {"3": 2, "4": 2, "base": 2}


def test_percentiles_are_over_ok_requests_and_match_numpy() -> None:
    s = summarize_results(RESULTS, SLO, duration_s=5.0)
    ttft = [0.1, 0.2, 0.5, 0.6, 0.3, 0.25]
    assert s.ttft_p50_s == pytest.approx(0.275)
    assert s.ttft_p99_s == pytest.approx(0.5 + 0.95 * 0.1)
    assert s.ttft_p90_s == pytest.approx(float(np.percentile(ttft, 90)))
    assert s.tpot_p50_s == pytest.approx(0.08)  # the one-token answer has no TPOT
    e2e = [r.e2e_s for r in RESULTS[:6]]
    assert s.e2e_p99_s == pytest.approx(float(np.percentile(e2e, 99)))


def test_the_send_lag_is_summarized_over_the_requests_sent() -> None:
    from dataclasses import replace

    lagged = [replace(r, late_s=0.001 * r.index) for r in RESULTS]
    lagged[9] = replace(lagged[9], late_s=5.0)  # the dropped one was never sent: not counted
    s = summarize_results(lagged, SLO, duration_s=5.0)
    assert s.send_late_max_s == pytest.approx(0.008)
    assert s.send_late_p99_s == pytest.approx(float(np.percentile(np.arange(9) * 0.001, 99)))
    assert summarize_results(RESULTS[9:], SLO, duration_s=1.0).send_late_max_s is None


def test_a_run_that_ended_past_its_schedule_has_its_throughput_over_the_run_too() -> None:
    from dataclasses import replace

    from collm_fl.loadgen import format_summary

    s = summarize_results(RESULTS, SLO, duration_s=5.0)
    assert s.last_done_s == pytest.approx(8.0 + 1.0)  # request 8, sent at 8 s, failed after 1 s
    assert s.throughput_over_run_rps == pytest.approx(6 / 9.0)  # 6 ok over 9 s, not over 5
    assert "0.667 req/s over the 9s until the last request ended" in format_summary(s, SLO)
    # A run whose last answer came within its schedule: the two are one rate, said once.
    on_time = summarize_results(RESULTS, SLO, duration_s=20.0)
    assert on_time.throughput_over_run_rps == pytest.approx(on_time.throughput_rps)
    assert "until the last request ended" not in format_summary(on_time, SLO)
    # A dropped request (never sent) ends nothing; a run of only dropped ones has no end.
    dropped = replace(RESULTS[9], sent_at=30.0)
    assert summarize_results([*RESULTS[:9], dropped], SLO, 5.0).last_done_s == pytest.approx(9)
    assert summarize_results([dropped], SLO, 5.0).last_done_s is None


def test_meets_slo_needs_success_and_both_bounds() -> None:
    assert [meets_slo(r, SLO) for r in RESULTS] == [True] * 3 + [False, False, True] + [False] * 4


def test_the_ttft_slo_counts_from_when_the_request_was_due() -> None:
    from dataclasses import replace

    fast = RESULTS[0]
    assert meets_slo(fast, SLO)
    room = SLO.ttft_s - fast.ttft_s
    assert meets_slo(replace(fast, late_s=0.9 * room), SLO)
    assert not meets_slo(replace(fast, late_s=1.1 * room), SLO)  # a lagging generator's credit


def test_a_run_without_successes_has_no_percentiles() -> None:
    s = summarize_results(RESULTS[6:], SLO, duration_s=2.0)
    assert (s.ok, s.goodput_rps, s.slo_attainment) == (0, 0.0, 0.0)
    assert s.ttft_p50_s is None and s.tpot_p99_s is None and s.e2e_p90_s is None
    empty = summarize_results([], SLO, duration_s=2.0)
    assert empty.requests == 0 and empty.slo_attainment == 0.0


def test_summary_needs_a_positive_duration() -> None:
    with pytest.raises(ConfigError, match=r"^duration_s"):
        summarize_results(RESULTS, SLO, duration_s=0.0)


def test_slos_scale_the_unloaded_latency() -> None:
    slo = slo_from_unloaded(0.1, 0.02, factor=5.0)
    assert slo.ttft_s == pytest.approx(0.5) and slo.tpot_s == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("args", "param"),
    [((0.1, 0.02, 0.5), "factor"), ((0.0, 0.02, 2.0), "ttft_unloaded_s"), ((0.1, -1, 2), "tpot")],
)
def test_invalid_slo_inputs_are_config_errors(args: tuple[float, float, float], param: str) -> None:
    with pytest.raises(ConfigError, match=f"^{param}"):
        slo_from_unloaded(*args)


def test_slo_spec_rejects_non_positive_bounds() -> None:
    with pytest.raises(ConfigError, match=r"^tpot_s"):
        SLOSpec(ttft_s=1.0, tpot_s=0.0)


def test_time_to_quality_is_the_first_time_at_or_below_target() -> None:
    points = [(30.0, 2.0), (0.0, 3.0), (10.0, 2.6), (20.0, 2.5), (40.0, 2.4)]
    assert time_to_quality(points, target_loss=2.5) == 20.0
    assert time_to_quality(points, target_loss=1.0) is None
    assert time_to_quality([], target_loss=1.0) is None


def test_served_quality_follows_the_version_switches() -> None:
    switches = [(10.0, 1), (0.0, 0), (20.0, 2)]
    losses = {0: 3.0, 1: 2.5, 2: 2.0}
    at = served_quality_at([0.0, 5.0, 10.0, 15.0, 25.0], switches, losses)
    assert at == [3.0, 3.0, 2.5, 2.5, 2.0]


def test_served_quality_refuses_to_guess() -> None:
    with pytest.raises(ConfigError, match=r"^times"):
        served_quality_at([-1.0], [(0.0, 0)], {0: 3.0})
    with pytest.raises(ConfigError, match=r"^loss_by_version"):
        served_quality_at([1.0], [(0.0, 0), (0.5, 7)], {0: 3.0})
    with pytest.raises(ConfigError, match=r"^version_switches"):
        served_quality_at([1.0], [], {0: 3.0})
