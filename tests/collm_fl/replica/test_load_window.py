"""The replica's load report: what the allocation policy reads each round."""

import pytest

from collm_fl.replica import metrics
from collm_fl.replica.metrics import SLO, LoadWindow, RequestRecord


@pytest.fixture()
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    return now


def test_serving_utilization_is_the_engine_busy_share_of_each_window(clock):
    window = LoadWindow(SLO(ttft_s=1.0, tpot_s=0.1))
    clock[0] += 10.0
    first = window.report(0, 0, 0.5, 0, reset=True, serving_busy_s=2.5)
    assert first.serving_utilization == pytest.approx(0.25)
    clock[0] += 4.0  # the engine computed 3 of the next 4 seconds
    second = window.report(0, 0, 0.5, 0, reset=True, serving_busy_s=5.5)
    assert second.serving_utilization == pytest.approx(0.75)
    assert second.to_metrics()["load-serving-utilization"] == pytest.approx(0.75)


def test_a_report_without_reset_keeps_the_window_open(clock):
    window = LoadWindow(SLO(ttft_s=1.0, tpot_s=0.1))
    window.add(RequestRecord(100.0, ttft=0.2, tpot=0.05, status="ok", output_tokens=4))
    clock[0] += 2.0
    peek = window.report(1, 2, 0.0, 0, reset=False, serving_busy_s=1.0)
    clock[0] += 2.0
    full = window.report(1, 2, 0.0, 0, reset=True, serving_busy_s=1.0)
    assert peek.requests == full.requests == 1 and peek.slo_attainment == 1.0
    assert peek.serving_utilization == pytest.approx(0.5)
    assert full.serving_utilization == pytest.approx(0.25)


def test_the_window_keeps_at_most_max_records_until_a_reset(clock):
    # Nothing resets the window on a replica no federation polls: it must stay bounded.
    window = LoadWindow(SLO(ttft_s=1.0, tpot_s=0.1), max_records=50)
    for i in range(175):
        window.add(RequestRecord(100.0 + i, ttft=0.2, tpot=0.05, status="ok", output_tokens=1))
    clock[0] += 10.0
    assert window.report(0, 0, 0.0, 0, reset=False).requests == 50  # the newest 50
    assert window.report(0, 0, 0.0, 0, reset=True).requests == 50
    assert window.report(0, 0, 0.0, 0, reset=True).requests == 0


def test_a_client_that_left_is_load_and_a_miss_once_it_waited_past_the_ttft_slo(clock):
    window = LoadWindow(SLO(ttft_s=1.0, tpot_s=0.1))
    window.add(RequestRecord(100.0, ttft=0.2, tpot=0.05, status="ok", output_tokens=4))
    # Left after waiting 3 s with no token; left after a late first token; left early.
    window.add(RequestRecord(100.0, None, None, "cancelled", 0, waited_s=3.0))
    window.add(RequestRecord(100.0, ttft=2.0, tpot=None, status="cancelled", output_tokens=1))
    window.add(RequestRecord(100.0, None, None, "cancelled", 0, waited_s=0.1))
    clock[0] += 4.0
    report = window.report(0, 0, 0.0, 0, reset=True)
    assert report.requests == 4 and report.request_rate == pytest.approx(1.0)
    assert report.slo_attainment == pytest.approx(1 / 3)  # the early leaver is not judged
    assert report.ttft_p99 == pytest.approx(2.98)  # the waits enter as lower bounds: 0.2, 2, 3
    assert report.output_tokens_per_s == pytest.approx(5 / 4)


def test_rates_over_a_full_window_are_per_the_time_its_kept_records_span(clock):
    window = LoadWindow(SLO(ttft_s=1.0, tpot_s=0.1), max_records=50)
    for i in range(200):  # 2 requests/s for 100 s; only the last 25 s are kept
        clock[0] = 100.0 + i / 2
        window.add(RequestRecord(clock[0], ttft=0.2, tpot=0.05, status="ok", output_tokens=1))
    clock[0] = 200.0
    report = window.report(0, 0, 0.0, 0, reset=True)
    assert report.requests == 50 and report.window_s == pytest.approx(100.0)
    assert report.request_rate == pytest.approx(2.0, rel=0.05)
    window.add(RequestRecord(200.0, ttft=0.2, tpot=0.05, status="ok", output_tokens=1))
    clock[0] = 210.0
    assert window.report(0, 0, 0.0, 0, reset=True).request_rate == pytest.approx(0.1)


def test_training_steps_are_those_since_the_last_reset(clock):
    # The trainer's lifetime total was reported: every window after the first counted the
    # steps of all earlier ones too.
    window = LoadWindow(SLO(ttft_s=1.0, tpot_s=0.1))
    assert window.report(0, 0, 0.5, training_steps=4, reset=True).training_steps == 4
    assert window.report(0, 0, 0.5, training_steps=4, reset=True).training_steps == 0
    assert window.report(0, 0, 0.5, training_steps=7, reset=False).training_steps == 3
    assert window.report(0, 0, 0.5, training_steps=9, reset=True).training_steps == 5
