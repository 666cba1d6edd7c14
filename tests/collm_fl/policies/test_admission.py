"""Admission control: shed a request when even the best replica would miss its TTFT SLO."""

import math
from dataclasses import replace

import pytest

from collm_fl.policies.routing import (
    ReplicaView,
    Shed,
    admission_decision,
    failure_penalty_s,
    predict_latency,
)
from collm_fl.replica.metrics import SLO

SLO_ = SLO(ttft_s=1.0, tpot_s=0.1)
IDLE = ReplicaView(name="a", healthy=True, ewma_ttft_s=0.05, ewma_tpot_s=0.01, max_batch=4)
# 8 requests on 4 slots, 100 tokens left each: 5 slot releases to wait for (≈ 1.7 s of TTFT).
BURST = {"in_flight": 8, "in_flight_tokens": 800}


def view(name: str, **kw: object) -> ReplicaView:
    return replace(IDLE, name=name, **kw)


def saturated() -> list[ReplicaView]:
    return [view("a", **BURST), view("b", **BURST)]


def test_shedding_off_admits_whatever_the_load():
    assert predict_latency(saturated()[0], 0, 16).ttft_s > SLO_.ttft_s
    assert admission_decision(saturated(), 0, 16, SLO_, shed_factor=0) is None
    deep = [view("a", queue_depth=10_000), view("b", queue_depth=10_000)]
    assert admission_decision(deep, 0, 16, SLO_, shed_factor=0) is None


def test_a_burst_that_fills_every_batch_is_shed_with_the_predicted_ttft_and_the_limit():
    shed = admission_decision(saturated(), 0, 16, SLO_, shed_factor=1.5)
    assert shed is not None
    expected = predict_latency(saturated()[0], 0, 16).ttft_s
    assert shed.predicted_ttft_s == pytest.approx(expected)
    assert shed.predicted_ttft_s > 1.5 * SLO_.ttft_s
    assert shed.limit_s == pytest.approx(1.5)
    assert shed.retry_after_s == max(1, math.ceil(expected - 1.5))
    assert shed.replica == "a"  # equal predictions: the first by name
    assert "shed" in shed.reason
    assert f"predicted TTFT {expected:.3g} s" in shed.reason
    assert "shed-factor × TTFT SLO = 1.5 × 1 s = 1.5 s" in shed.reason


def test_one_idle_replica_is_enough_to_admit():
    views = [view("a", **BURST), view("b")]
    assert admission_decision(views, 0, 16, SLO_, shed_factor=1) is None


def test_unhealthy_and_excluded_replicas_do_not_count_as_room():
    views = [view("a", **BURST), view("b", healthy=False), view("c")]
    assert admission_decision(views, 0, 16, SLO_, shed_factor=1, exclude={"c"}) is not None


def test_nothing_is_shed_before_any_replica_is_measured():
    unmeasured = [replace(v, ewma_ttft_s=None, ewma_tpot_s=None) for v in saturated()]
    assert predict_latency(unmeasured[0], 0, 16).ttft_s > SLO_.ttft_s  # priors alone would shed
    assert admission_decision(unmeasured, 0, 16, SLO_, shed_factor=1) is None
    # One measured replica is enough: its peers are assumed like it (as routing does).
    some = [unmeasured[0], replace(unmeasured[1], ewma_tpot_s=0.01)]
    assert admission_decision(some, 0, 16, SLO_, shed_factor=1) is not None


def test_a_recent_failure_never_sheds_a_request_an_idle_replica_would_answer_in_time():
    # The penalty ranks replicas for routing; it is not time the request would wait. Counted as
    # TTFT, one failure per replica shed every request for seconds, and a request shed never
    # reaches a replica, so no success could clear it.
    failing = view("a", consecutive_failures=3, last_error_age_s=0.0)
    assert predict_latency(failing, 0, 16).ttft_s < SLO_.ttft_s < failure_penalty_s(failing)
    assert admission_decision([failing], 0, 16, SLO_, shed_factor=1) is None
    # Load still sheds on such a replica.
    assert admission_decision([replace(failing, **BURST)], 0, 16, SLO_, shed_factor=1) is not None


def test_only_the_candidates_measurements_allow_shedding():
    # "a" (measured) serves another model or was tried: "b" was never measured, and its
    # prediction would rest on priors (and another replica's latencies) alone.
    unmeasured_busy = view("b", ewma_ttft_s=None, ewma_tpot_s=None, queue_depth=10_000)
    views = [view("a"), unmeasured_busy]
    assert admission_decision(views, 0, 16, SLO_, shed_factor=1, exclude={"a"}) is None


def test_a_burst_admitted_together_is_shed_though_its_mean_would_admit():
    # 4 slots all started together with 100 tokens left each, one request queued: the new one
    # waits for the queued one's slot, 100 steps, not the 2 · 100 / 4 = 50 a mean rate gives.
    burst = {"in_flight": 5, "in_flight_tokens": 500, "remaining_tokens": (100,) * 5}
    mean_only = view("a", in_flight=5, in_flight_tokens=500)
    assert predict_latency(mean_only, 0, 16).ttft_s < SLO_.ttft_s
    assert predict_latency(view("a", **burst), 0, 16).ttft_s > SLO_.ttft_s
    assert admission_decision([view("a", **burst)], 0, 16, SLO_, shed_factor=1) is not None


def test_more_load_is_shed_no_earlier_than_less_load():
    def shed_at(depth: int, factor: float) -> bool:
        views = [view("a", queue_depth=depth), view("b", queue_depth=depth + 1)]
        return admission_decision(views, 32, 64, SLO_, shed_factor=factor) is not None

    for factor in (1.0, 2.0, 4.0):
        decisions = [shed_at(depth, factor) for depth in range(60)]
        first = decisions.index(True)  # some load is shed, some admitted ...
        assert first > 0 and all(decisions[first:])  # ... and once shed, more load is too
    # A larger factor sheds no earlier.
    firsts = [[shed_at(d, f) for d in range(60)].index(True) for f in (1.0, 2.0, 4.0)]
    assert firsts == sorted(firsts) and firsts[0] < firsts[-1]


@pytest.mark.parametrize(
    ("predicted", "retry_after"), [(1.6, 1), (2.5, 1), (2.51, 2), (9.0, 8), (4000.0, 60)]
)
def test_a_shed_requests_retry_after_is_when_its_backlog_drains(predicted, retry_after):
    assert Shed("a", predicted, shed_factor=1.5, ttft_slo_s=1.0).retry_after_s == retry_after
