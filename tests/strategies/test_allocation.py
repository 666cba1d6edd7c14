import json
import logging
from dataclasses import replace

import pytest

from strategies.allocation import (
    SLO_RESERVE,
    TURN_SLACK,
    TURN_UTILIZATION,
    AllocationInputs,
    NodeBudget,
    NodeLoad,
    NodeState,
    allocate,
    forecast_rate,
    headroom,
    load_from_metrics,
    quality_gain_factor,
    turn_before,
)

SLO = dict(ttft_slo_s=2.0, tpot_slo_s=0.2)


def load(rate: float, ttft: float = 0.2, tpot: float = 0.02, attain: float = 1.0, queue: float = 0):
    return NodeLoad(
        request_rate=rate, queue_depth=queue, ttft_p95=ttft, tpot_p95=tpot, slo_attainment=attain
    )


def inputs(nodes, history=(), deadline=600.0, max_steps=20, turns=True):
    return AllocationInputs(
        nodes=tuple(nodes),
        deadline_s=deadline,
        max_steps=max_steps,
        loss_history=tuple(history),
        turns=turns,  # (off by default: on here, so that every test sees them where they apply)
        **SLO,
    )


def replica(node_id, node_load, step_s=None):
    return NodeState(node_id, node_load, node_load.request_rate, step_s)


def test_more_load_means_less_training():
    light = replica(1, load(0.5, ttft=0.3, tpot=0.03))
    heavy = replica(2, load(4.0, ttft=1.2, tpot=0.12))
    by_node = {b.node_id: b for b in allocate(inputs([light, heavy]))}
    assert by_node[1].steps > by_node[2].steps
    assert by_node[1].share > by_node[2].share


def test_idle_replica_trains_with_the_whole_replica():
    (b,) = allocate(inputs([replica(1, load(0.0))]))
    assert b.share == 1.0 and b.steps == 20


def test_overloaded_replica_trains_at_the_minimum_share():
    (b,) = allocate(inputs([replica(1, load(3.0, ttft=2.5, tpot=0.25, attain=0.3))]))
    assert b.share == 0.1 and 0 < b.steps < 20


def test_without_a_minimum_share_an_overloaded_replica_sits_the_round_out():
    x = replace(inputs([replica(1, load(3.0, ttft=2.5, tpot=0.25, attain=0.3))]), min_share=0.0)
    (b,) = allocate(x)
    assert b.steps == 0 and b.share == 0.0 and "sits out" in b.reason


def test_busy_replica_at_its_slo_still_trains_at_the_minimum_share():
    (b,) = allocate(inputs([replica(1, load(3.0, ttft=2.5, tpot=0.25, attain=0.8))]))
    assert b.share == 0.1 and 0 < b.steps < 20


def test_no_training_beyond_the_deadline():
    # 1 s per step at share 0.5 within 10 s: at most 5 steps, whatever the budget says.
    node = replica(1, load(0.5, ttft=1.0, tpot=0.1), step_s=1.0)
    (b,) = allocate(inputs([node], deadline=10.0, max_steps=100))
    assert b.steps * 1.0 / b.share <= 10.0 + 1e-9
    # A deadline fitting 5.5 steps at that share plans 5 (never rounded up past it).
    (b,) = allocate(inputs([node], deadline=11.0, max_steps=100))
    assert b.share == pytest.approx(0.5) and b.steps == 5
    device = NodeState(2, None, 0.0, 2.0)
    (d,) = allocate(inputs([device], deadline=10.0, max_steps=100))
    assert d.steps * 2.0 <= 10.0


def test_flattening_quality_gain_means_less_training():
    improving = [(0, 3.0), (20, 2.5), (40, 2.0), (60, 1.5)]
    flattening = [(0, 3.0), (20, 2.5), (40, 2.45), (60, 2.44)]
    node = replica(1, load(0.0))
    (fast,) = allocate(inputs([node], improving))
    (slow,) = allocate(inputs([node], flattening))
    assert slow.steps < fast.steps
    assert quality_gain_factor(flattening) < quality_gain_factor(improving)


def test_quality_gain_factor_is_bounded_and_neutral_without_history():
    assert quality_gain_factor([]) == 1.0
    assert quality_gain_factor([(0, 3.0), (10, 2.0)]) == 1.0
    # Two noisy differences are no trend: three points never cut the budget.
    assert quality_gain_factor([(0, 3.0), (10, 2.0), (20, 1.99)]) == 1.0
    worse = [(0, 2.0), (10, 1.0), (20, 1.5), (30, 1.6)]
    assert quality_gain_factor(worse, floor=0.2) == pytest.approx(0.2)


def test_a_flat_loss_curve_gets_no_more_training_for_a_blip_of_gain():
    flat = [(0, 2.0), (10, 2.0), (20, 2.0), (30, 2.0), (40, 2.0)]
    blip = [(0, 2.0), (10, 2.0), (20, 2.0), (30, 1.999), (40, 1.999)]
    learned_then_flat = [(0, 3.0), (10, 2.0), (20, 2.0), (30, 1.999), (40, 1.999)]
    assert quality_gain_factor(flat) == pytest.approx(0.2)
    assert quality_gain_factor(blip) == pytest.approx(0.2)
    assert quality_gain_factor(learned_then_flat) == pytest.approx(0.2)
    # Rounds that measured no gain are no reference: learning that starts late is not judged
    # flattening, however many rounds came before, and a tiny early gain does not set the scale.
    late = [(0, 3.0), (10, 3.0), (20, 3.0), (30, 2.5), (40, 2.0)]
    assert quality_gain_factor(late) == 1.0
    assert quality_gain_factor([(0, 3.0), (10, 2.9999), *late[2:]]) == 1.0


def test_a_busy_rounds_few_steps_are_judged_with_the_next_round_not_as_no_gain():
    # The same gain per step (0.001) in rounds of 20 steps (the configured local steps), then in
    # rounds of 1 (a busy replica's): a round's change under the noise bar counted as none, and
    # the budget fell to the floor, where the busy replica's few steps stayed under the bar.
    steady = [(0, 2.0), (20, 1.98), (40, 1.96), (41, 1.959), (42, 1.958)]
    assert quality_gain_factor(steady, round_steps=20) == 1.0
    assert quality_gain_factor(steady) == pytest.approx(0.2)  # (each round judged alone)
    steadier = [*steady, *((42 + k, 1.958 - 0.001 * k) for k in range(1, 19))]  # 20 steps on
    assert quality_gain_factor(steadier, round_steps=20) == 1.0
    # A curve that is flat in short rounds still reaches the floor, once as many steps as a whole
    # round's have told nothing.
    flat_short = [(0, 2.0), (20, 1.98), (40, 1.96), *((40 + k, 1.96) for k in range(1, 41))]
    assert quality_gain_factor(flat_short, round_steps=20) == pytest.approx(0.2)
    # 20 flat steps (one round's) halve the latest gain; 19 are too few to tell yet.
    assert quality_gain_factor(flat_short[:-20], round_steps=20) == pytest.approx(0.5)
    assert quality_gain_factor(flat_short[:-21], round_steps=20) == 1.0
    # Spans are cut by steps alone: a short round's larger gain never lowers the factor.
    early = [(0, 3.0), (20, 2.8), (40, 2.6)]
    factors = [
        quality_gain_factor([*early, (41, 2.6 - g), (61, 2.6 - g)], round_steps=20)
        for g in (0.0, 0.002, 0.003, 0.01)
    ]
    assert factors == sorted(factors)
    # Through allocate: the configured local steps are the round.
    node = replica(1, load(0.0))
    (busy,) = allocate(inputs([node], steady, max_steps=20))
    assert busy.steps == 20


def test_flattening_gains_never_raise_the_factor():
    # The same early curve, the latest per-step gains swept down from steep to none.
    early = [(0, 3.0), (10, 2.8), (20, 2.6)]
    factors = [
        quality_gain_factor([*early, (30, 2.6 - g), (40, 2.6 - 2 * g)])
        for g in (0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0)
    ]
    assert factors == sorted(factors, reverse=True)
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.2)


def test_inputs_out_of_range_are_refused_and_an_unmeasurable_step_time_is_unknown():
    node = replica(1, load(0.0))
    for bad in (dict(min_gain_factor=float("nan")), dict(min_gain_factor=1.5)):
        with pytest.raises(ValueError, match="min_gain_factor"):
            replace(inputs([node]), **bad)
    with pytest.raises(ValueError, match="min_share"):
        replace(inputs([node]), min_share=-0.1)
    with pytest.raises(ValueError, match="deadline_s"):
        replace(inputs([node]), deadline_s=float("nan"))
    with pytest.raises(ValueError, match="max_steps"):  # (it planned one step all the same)
        replace(inputs([node]), max_steps=0)
    # A NaN step time plans as an unknown one does (the target scaled by the share), not the
    # whole target uncapped.
    busy = replace(load(1.0, ttft=0.5, tpot=0.05), utilization=0.9)
    (nan_step,) = allocate(inputs([replica(1, busy, step_s=float("nan"))], deadline=5.0))
    (unknown,) = allocate(inputs([replica(1, busy, step_s=None)], deadline=5.0))
    assert nan_step.steps == unknown.steps == 2


def test_rising_forecast_eats_headroom():
    now = load(1.0, ttft=0.5, tpot=0.05)
    assert headroom(now, forecast=2.0, **SLO) < headroom(now, forecast=1.0, **SLO)


def _forecasts(rates: list[float]) -> list[float]:
    f, out = None, []
    for r in rates:
        f = forecast_rate(f, r)
        out.append(f.next)
    return out


def test_the_forecast_follows_the_trend_of_the_rate():
    assert _forecasts([3.0]) == [3.0]
    assert _forecasts([2.0] * 5)[-1] == pytest.approx(2.0)  # steady: itself
    rising = [1.0, 2.0, 3.0, 4.0]
    assert _forecasts(rising)[-1] > rising[-1]  # rising: more than the latest report
    falling = rising[::-1]
    assert _forecasts(falling)[-1] < falling[-1]  # falling: less
    assert _forecasts([4.0, 0.0, 0.0])[-1] >= 0.0  # never negative


def test_a_rising_rate_costs_training_and_a_falling_one_does_not():
    # The growth factor of the headroom comes from the forecast: as the rate rises the replica
    # keeps more for serving than its latest utilization says; as it falls, no more.
    def room(rates: list[float]) -> float:
        now = NodeLoad(rates[-1], 0.0, 0.5, 0.05, 1.0, utilization=0.4)
        return headroom(now, _forecasts(rates)[-1], **SLO)

    steady = room([2.0] * 4)
    assert room([0.5, 1.0, 1.5, 2.0]) < steady
    assert room([3.5, 3.0, 2.5, 2.0]) == pytest.approx(steady)


def test_a_sudden_fall_in_load_costs_no_training():
    # Holt's forecast lags a sudden fall: 1.0 req/s, then 0.1 forecasts 0.325, above the report.
    # With the same latencies (no utilization report), the quieter replica must not train less.
    def budget(rates: list[float]) -> NodeBudget:
        f = None
        for r in rates:
            f = forecast_rate(f, r)
        assert f is not None
        now = NodeLoad(rates[-1], 0.0, 1.0, 0.1, 1.0)
        (b,) = allocate(inputs([NodeState(1, now, f.next, 1.0, forecast_trend=f.trend)]))
        return b

    fell = budget([1.0, 1.0, 0.1])
    assert _forecasts([1.0, 1.0, 0.1])[-1] > 0.1  # (the lag itself)
    assert fell.share >= budget([1.0, 1.0, 0.5]).share
    assert fell.steps >= budget([1.0, 1.0, 0.5]).steps
    assert fell.share == pytest.approx(budget([0.1, 0.1, 0.1]).share)  # as if it had been quiet
    # A forecast whose trend is unknown still counts its growth (callers without a trend).
    now = NodeLoad(0.1, 0.0, 1.0, 0.1, 1.0)
    assert headroom(now, 0.325, **SLO) < headroom(now, 0.325, **SLO, trend=-0.2)


def _budget_after(rates: list[float], utilization: float | None, ttft: float) -> NodeBudget:
    f = None
    for r in rates:
        f = forecast_rate(f, r)
    assert f is not None
    now = NodeLoad(rates[-1], 0.0, ttft, 0.04, 1.0, utilization=utilization)
    node = NodeState(1, now, f.next, 30.0, forecast_trend=f.trend)
    (b,) = allocate(inputs([node], max_steps=20, turns=False))
    return b


@pytest.mark.parametrize("before", [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 2.0, 2.0], [0, 0, 0]])
@pytest.mark.parametrize("measured", [True, False])
def test_more_load_never_means_more_training(before, measured):
    # The latest report swept from idle to overload, its utilization and latency rising with it
    # (or, without a utilization report, the latency alone): the share and the steps never rise.
    # (A forecast measured against the latest report instead of its smoothed level doubled the
    # training of a replica going from 0.69 to 3 req/s after [1, 2, 3].)
    last: NodeBudget | None = None
    for k in range(121):
        x = k * 0.05
        b = _budget_after([*before, x], min(0.95, x / 4) if measured else None, 0.2 + 0.2 * x)
        if last is not None:
            assert b.share <= last.share + 1e-12, (x, b, last)
            assert b.steps <= last.steps, (x, b, last)
        last = b


def test_a_spike_already_in_the_report_is_not_counted_twice():
    # 1, 1, 1, then 10 req/s: the forecast (7.75) lies below the report the utilization measured.
    spike = _budget_after([1.0, 1.0, 1.0, 10.0], 0.5, 0.4)
    assert spike.share == pytest.approx(0.5)


def test_a_trend_turning_from_falling_to_rising_costs_no_sudden_training():
    # After [1, 2, 3] a report of 0.68 or 0.69 req/s puts the trend just below or just above 0:
    # the shares differ by no more than the reports do.
    low, high = _budget_after([1, 2, 3, 0.68], 0.3, 0.4), _budget_after([1, 2, 3, 0.69], 0.3, 0.4)
    assert low.share == pytest.approx(high.share, abs=0.01)


def test_load_from_metrics_reads_replica_reports_and_ignores_devices():
    metrics = {
        "load-request-rate": 1.5,
        "load-queue-depth": 2,
        "load-ttft-p95": 0.4,
        "load-tpot-p95": 0.05,
        "load-slo-attainment": 0.9,
    }
    assert load_from_metrics(metrics) == NodeLoad(1.5, 2, 0.4, 0.05, 0.9)
    assert load_from_metrics({"train-loss": 1.0}) is None


def test_with_a_utilization_report_training_takes_what_serving_leaves():
    def share(utilization: float, ttft: float = 0.5) -> float:
        node = replace(load(1.0, ttft=ttft, tpot=0.05), utilization=utilization)
        (b,) = allocate(inputs([replica(1, node)]))
        return b.share

    assert share(0.25) == pytest.approx(0.75)
    assert share(0.6) == pytest.approx(0.4)
    assert share(0.6) < share(0.25)
    # Latencies beyond the SLO (p95 TTFT 2x the 2 s SLO) keep SLO_RESERVE more for serving.
    assert share(0.25, ttft=4.0) == pytest.approx(0.75 - SLO_RESERVE)
    # Rising forecast load scales the serving it must keep.
    node = replace(load(1.0, ttft=0.5, tpot=0.05), utilization=0.25)
    (b,) = allocate(inputs([NodeState(1, node, 2.0, None)]))
    assert b.share == pytest.approx(0.5)


def test_few_but_long_requests_keep_what_their_measured_utilization_needs():
    node = replace(load(0.01, ttft=0.5, tpot=0.05), utilization=0.9)  # below the idle rate
    (b,) = allocate(inputs([replica(1, node)]))
    assert b.share == pytest.approx(0.1)
    quiet = replace(load(0.01, ttft=0.5, tpot=0.05), utilization=0.0)
    assert allocate(inputs([replica(1, quiet)]))[0].share == 1.0


def test_the_utilization_report_is_read_when_present():
    metrics = {
        "load-request-rate": 1.0,
        "load-queue-depth": 0,
        "load-ttft-p95": 0.4,
        "load-tpot-p95": 0.05,
        "load-slo-attainment": 1.0,
    }
    assert load_from_metrics(metrics).utilization is None
    assert load_from_metrics({**metrics, "load-serving-utilization": 0.3}).utilization == 0.3


def test_one_flat_round_after_steady_gains_does_not_cut_the_budget_to_the_floor():
    noisy = [(0, 3.0), (10, 2.8), (20, 2.6), (30, 2.6)]  # the last round measured no gain
    assert 0.4 <= quality_gain_factor(noisy) <= 0.6  # mean of the last two rates vs the first


def test_busy_replicas_get_the_rest_of_the_target_as_idle_only_backfill():
    light = replica(1, load(0.5, ttft=0.3, tpot=0.03), step_s=1.0)
    heavy = replica(2, load(4.0, ttft=1.2, tpot=0.12), step_s=1.0)
    device = NodeState(3, None, 0.0, None)
    by_node = {b.node_id: b for b in allocate(inputs([light, heavy, device], deadline=10.0))}
    for n in (1, 2):
        b = by_node[n]
        assert b.steps + b.backfill_steps == 20  # the target, planned or on idle cycles
        assert b.backfill_steps > 0 and "backfill" in b.reason and not b.sits_out
    assert by_node[2].backfill_steps > by_node[1].backfill_steps  # more load: more left to idle
    assert by_node[3].backfill_steps == 0  # a device has no serving to wait for


def test_backfill_can_be_turned_off_and_a_true_sit_out_has_none():
    busy = replica(1, load(3.0, ttft=2.5, tpot=0.25, attain=0.3))
    (b,) = allocate(replace(inputs([busy]), backfill=False))
    assert b.backfill_steps == 0
    (out,) = allocate(replace(inputs([busy]), min_share=0.0))
    assert out.sits_out and out.backfill_steps == 0


def test_a_replica_whose_steps_do_not_fit_still_trains_on_idle_cycles():
    slow = replica(1, load(3.0, ttft=2.5, tpot=0.25, attain=0.3), step_s=50.0)
    (b,) = allocate(inputs([slow], deadline=10.0))
    assert b.steps == 0 and b.backfill_steps == 20 and not b.sits_out
    assert "20 on idle or late-only cycles" in b.reason


def test_the_server_side_tracker_passes_its_settings_and_records_the_decision(tmp_path, caplog):
    from collm_fl.config import RunConfig
    from collm_fl.store import VersionStore
    from server_app.coordination import CoordinationState

    store = VersionStore(tmp_path / "store")
    run_id = store.open_run("r", {}, "tiny").id
    metrics = {
        "load-request-rate": 3.0,
        "load-queue-depth": 0.0,
        "load-ttft-p95": 0.5,
        "load-tpot-p95": 0.05,
        "load-slo-attainment": 1.0,
        "load-serving-utilization": 0.7,
    }
    for backfill in (True, False):
        state = CoordinationState()
        state.observe(1, metrics)
        cfg = RunConfig(local_steps=10, round_deadline_s=1000.0, backfill=backfill)
        (b,) = state.budgets(cfg, [1], store, run_id, 1).values()
        assert b.steps < 10 and (b.backfill_steps == 10 - b.steps) is backfill
    # min-training-share: the floor lifts a busy replica's share (0.3 of headroom here) and its
    # plan (its step time unknown yet: the target scaled by the share).
    state = CoordinationState()
    state.observe(1, metrics)
    cfg = RunConfig(local_steps=10, round_deadline_s=1000.0, min_training_share=0.9)
    (b,) = state.budgets(cfg, [1], store, run_id, 2).values()
    assert (b.steps, b.backfill_steps, b.share) == (9, 1, 0.9)
    decisions = store.events(run_id, "allocation")
    assert [d.payload["inputs"]["backfill"] for d in decisions] == [True, False, True]
    assert [d.payload["inputs"]["min_share"] for d in decisions] == [0.1, 0.1, 0.9]
    assert [d.payload["stale-loads"] for d in decisions] == [[], [], []]
    # A round with no report from the replica since (its train reply and ack both lost): its
    # last report informs the decision again, and the decision says so.
    with caplog.at_level(logging.DEBUG, logger="server_app.coordination"):
        state.budgets(cfg, [1], store, run_id, 3)
        state.budgets(cfg, [1], store, run_id, 4)
    decisions = store.events(run_id, "allocation")
    assert [d.payload["stale-loads"] for d in decisions[-2:]] == [[1], [1]]
    said = [r.levelname for r in caplog.records if "sent no load report" in r.getMessage()]
    assert said == ["WARNING", "DEBUG"]  # (once a silence)
    # Stored with every input: replayed, each decides as it did.
    from strategies.allocation import inputs_from_json

    for d in decisions:
        replayed = allocate(inputs_from_json(d.payload["inputs"]))
        assert replayed == [NodeBudget(**b) for b in d.payload["budgets"]]
    # A record of an older collm: fields since removed are left out, those since added default;
    # one without a required field is named.
    old = json.loads(json.dumps(decisions[0].payload["inputs"]))
    old["nodes"][0]["load"]["ttft_p99"] = 0.9
    del old["nodes"][0]["forecast_trend"], old["turns"]
    assert allocate(inputs_from_json(old))[0].steps == decisions[0].payload["budgets"][0]["steps"]
    del old["nodes"][0]["load"]["request_rate"]
    with pytest.raises(ValueError, match=r"not a stored NodeLoad: .*request_rate"):
        inputs_from_json(old)


def test_a_device_too_slow_for_a_step_sits_out_only_until_its_speed_is_measured_again(tmp_path):
    # One slow round (70 s a step, a 60 s deadline) sat the device out for good: not asked, it
    # was never measured again, and its one step time stayed its speed (through a resume too).
    from collm_fl.config import RunConfig
    from collm_fl.store import VersionStore
    from server_app.coordination import CoordinationState

    store = VersionStore(tmp_path / "store")
    run_id = store.open_run("r", {}, "tiny").id
    cfg = RunConfig(local_steps=5, round_deadline_s=60.0)
    state = CoordinationState()
    state.observe(1, {"local-steps": 1.0, "train-seconds": 70.0})
    state.observe(1, {"local-steps": 1.0, "train-seconds": 80.0})
    asked = [state.budgets(cfg, [1], store, run_id, rnd)[1].steps for rnd in range(1, 5)]
    assert asked == [0, 0, 5, 5]  # two rounds out (two measurements), then measured again
    state.observe(1, {"local-steps": 5.0, "train-seconds": 50.0})  # a faster day: 10 s a step
    assert state.budgets(cfg, [1], store, run_id, 5)[1].steps == 5


def test_a_broken_rate_report_leaves_the_forecast_as_it_was():
    steady = forecast_rate(forecast_rate(None, 1.0), 1.0)
    for bad in (float("inf"), float("nan"), -1.0):
        assert forecast_rate(steady, bad) == steady
    assert forecast_rate(None, float("nan")).next == 0.0


def test_a_rejected_replys_claimed_speed_is_not_believed_but_its_load_is():
    from server_app.coordination import CoordinationState

    state = CoordinationState()
    state.observe(1, {"local-steps": 5.0, "train-seconds": 10.0})
    load = {
        "load-request-rate": 2.0,
        "load-queue-depth": 0.0,
        "load-ttft-p95": 0.5,
        "load-tpot-p95": 0.05,
        "load-slo-attainment": 1.0,
    }
    state.observe(1, {"local-steps": 1e9, "train-seconds": 10.0, **load}, accepted=False)
    node = state.nodes[1]
    assert node.step_seconds == 2.0  # not 1e-8: it would stick as the node's fastest
    assert node.load is not None and node.load.request_rate == 2.0


def test_the_forecast_takes_one_observation_per_decision_from_the_merged_reports(tmp_path):
    from collm_fl.config import RunConfig
    from collm_fl.store import VersionStore
    from server_app.coordination import CoordinationState

    store = VersionStore(tmp_path / "store")
    run_id = store.open_run("r", {}, "tiny").id
    state = CoordinationState()
    busy = {**LOAD_METRICS, "load-request-rate": 2.0, "load-window-s": 50.0}
    quiet = {**LOAD_METRICS, "load-request-rate": 0.0, "load-window-s": 5.0}
    state.observe(1, busy)
    state.observe(1, quiet)  # a short publish window without a request
    assert state.nodes[1].forecast is None  # nothing forecast until a decision
    state.budgets(RunConfig(), [1], store, run_id, 1)
    assert state.nodes[1].forecast.level == pytest.approx(100 / 55)  # the merged rate, once
    state.budgets(RunConfig(), [1], store, run_id, 2)  # no new report: no new observation
    assert state.nodes[1].forecast.level == pytest.approx(100 / 55)


def test_a_denormal_step_time_plans_the_target_instead_of_overflowing():
    (b,) = allocate(inputs([replica(1, load(0.0), step_s=5e-324)], max_steps=20))
    assert b.steps == 20


def test_a_larger_latest_gain_never_cuts_the_next_budget():
    steady = [(0, 10.0), (10, 9.0), (20, 8.0), (30, 7.0)]
    assert quality_gain_factor(steady) == 1.0
    for last in (6.0, 5.0, 2.0):  # a lucky round: more gain than ever
        assert quality_gain_factor([*steady[:3], (30, last)]) == 1.0


def test_no_gain_in_the_first_round_does_not_pin_the_factor_to_the_floor():
    # The first promoted round measured nothing (noise within the gate's margin), the later
    # ones improved steadily: training still helps.
    assert quality_gain_factor([(0, 2.00), (20, 2.01), (40, 1.80), (60, 1.60)]) > 0.9
    assert quality_gain_factor([(0, 2.00), (20, 1.9999), (40, 1.80), (60, 1.60)]) > 0.9
    assert quality_gain_factor([(0, 2.0), (20, 2.0), (40, 2.0), (60, 2.0)]) == 0.2  # none: floor


LOAD_METRICS = {
    "load-request-rate": 1.0,
    "load-queue-depth": 0.0,
    "load-ttft-p95": 5.0,  # 2.5 x the 2-s SLO while it trained
    "load-tpot-p95": 0.05,
    "load-slo-attainment": 0.4,
    "load-serving-utilization": 0.85,
    "load-window-s": 50.0,
}
QUIET_METRICS = {
    **LOAD_METRICS,
    "load-ttft-p95": 0.6,
    "load-slo-attainment": 1.0,
    "load-serving-utilization": 0.6,
    "load-window-s": 5.0,
}


def test_a_rounds_publish_report_adds_to_its_training_window_instead_of_replacing_it(tmp_path):
    from collm_fl.config import RunConfig
    from collm_fl.store import VersionStore
    from server_app.coordination import CoordinationState

    store = VersionStore(tmp_path / "store")
    run_id = store.open_run("r", {}, "tiny").id
    cfg = RunConfig(local_steps=20, round_deadline_s=1000.0)

    def decide(*reports):
        state = CoordinationState()
        for r in reports:
            state.observe(1, r)
        (b,) = state.budgets(cfg, [1], store, run_id, 1).values()
        return state, b

    _, train_only = decide(LOAD_METRICS)
    _, publish_only = decide(QUIET_METRICS)
    state, both = decide(LOAD_METRICS, QUIET_METRICS)
    assert both.share < publish_only.share  # the training window's pressure still counts
    assert both.share == pytest.approx(train_only.share, abs=0.05)  # 50 s of 55
    merged = state.nodes[1].load
    assert merged.ttft_p95 == 5.0 and merged.utilization == pytest.approx((0.85 * 50 + 3) / 55)
    # Once a decision used them, the next round's first report starts afresh.
    state.observe(1, QUIET_METRICS)
    assert state.nodes[1].load.ttft_p95 == 0.6


def test_merged_loads_weigh_rates_by_time_and_attainment_by_requests():
    from strategies.allocation import merge_loads

    a = NodeLoad(2.0, 1, 1.0, 0.1, 0.5, 0.8)  # 20 requests in 10 s, half on time
    b = NodeLoad(0.0, 3, 0.2, 0.3, 1.0, None)  # none in 30 s
    m = merge_loads(a, 10.0, b, 30.0)
    assert m.request_rate == pytest.approx(0.5) and m.queue_depth == 3
    assert m.slo_attainment == pytest.approx(0.5)  # only a's requests were judged
    assert (m.ttft_p95, m.tpot_p95, m.utilization) == (1.0, 0.3, 0.8)


def test_a_speed_no_node_could_have_is_not_believed_and_old_speeds_expire():
    from server_app.coordination import STEP_HISTORY, CoordinationState

    state = CoordinationState()
    state.observe(1, {"local-steps": 1.0, "train-seconds": 5e-324})
    assert state.nodes[1].step_seconds is None
    state.observe(1, {"local-steps": 2.0, "train-seconds": 1.0})  # one unusually fast round
    for _ in range(STEP_HISTORY):
        state.observe(1, {"local-steps": 2.0, "train-seconds": 4.0})
    assert state.nodes[1].step_seconds == 2.0  # not stuck at 0.5 for the rest of the run


def test_a_replicas_speed_is_its_steps_compute_not_their_waits_for_serving():
    # 4 steps in 42 s while serving shared the core, 13.4 s of it their own compute: taken as
    # 10.5 s a step, the share (which counts serving's part) was applied to it again, and the
    # deadline fit planned 2 steps a round where 5 fit.
    from server_app.coordination import CoordinationState

    state = CoordinationState()
    state.observe(1, {"local-steps": 4.0, "train-seconds": 42.0, "step-cost-seconds": 13.4})
    assert state.nodes[1].step_seconds == pytest.approx(3.35)
    state.observe(2, {"local-steps": 4.0, "train-seconds": 12.0})  # a device: its time in steps
    assert state.nodes[2].step_seconds == pytest.approx(3.0)
    # A replica's step cost of 0 (a coarse clock) is no measurement, not a cue to take the time
    # in steps, waits and all, after all.
    state.observe(3, {"local-steps": 4.0, "train-seconds": 42.0, "step-cost-seconds": 0.0})
    assert state.nodes[3].step_seconds is None
    # A publish ack's steps and seconds are no training's: only its load report counts.
    state.observe(4, {"local-steps": 1.0, "train-seconds": 0.5, "load-request-rate": 1.0}, False)
    assert state.nodes[4].step_seconds is None


def serving(node_id, utilization, step_s=1.0, rate=0.2, forecast=None):
    node = replace(load(rate, ttft=0.4, tpot=0.04), utilization=utilization)
    return NodeState(node_id, node, rate if forecast is None else forecast, step_s)


def test_under_light_load_replicas_train_one_after_another_with_the_whole_replica():
    nodes = [serving(1, 0.2), serving(2, 0.3, step_s=2.0), serving(3, 0.1)]
    device = NodeState(9, None, 0.0, 1.0)
    budgets = {b.node_id: b for b in allocate(inputs([*nodes, device], max_steps=4))}
    turns = sorted((budgets[n] for n in (1, 2, 3)), key=lambda b: b.start_after_s)
    assert [b.node_id for b in turns] == [1, 2, 3]  # round 1's order: as listed
    assert [b.start_after_s for b in turns] == pytest.approx(
        [0.0, 4 * 1.0 * TURN_SLACK, 4 * (1.0 + 2.0) * TURN_SLACK]
    )
    for b in turns:
        assert (b.steps, b.share, b.backfill_steps) == (4, 1.0, 0)
        assert b.reason.startswith("turn ")
    assert budgets[9].start_after_s == 0.0 and budgets[9].steps == 4  # devices do not wait
    assert [b.turn for b in turns] == [1, 2, 3] and budgets[9].turn == 0
    # A planned start (with slack) never leaves its turn too little of the deadline.
    tight = {b.node_id: b for b in allocate(inputs([*nodes, device], deadline=16, max_steps=4))}
    assert [tight[n].start_after_s for n in (1, 2, 3)] == pytest.approx([0.0, 5.0, 12.0])
    # ... nor comes after the next turn's (lengths 10, 1, 5 s: turn 3's cap binds turn 2 too)
    uneven = [serving(1, 0.1, step_s=2.5), serving(2, 0.1, step_s=0.25), serving(3, 0.1, 1.25)]
    starts = [b.start_after_s for b in allocate(inputs(uneven, deadline=16, max_steps=4))]
    assert starts == pytest.approx([0.0, 11.0, 11.0])
    # A turn left out of the round (a strategy sampling nodes) passes its place on.
    assert turn_before(b for b in budgets.values() if b.node_id != 2) == {3: 1}
    # The server holds turn 2 until node 1's update is back, turn 3 until node 2's.
    assert turn_before(budgets.values()) == {2: 1, 3: 2}
    no_turns = allocate(replace(inputs([*nodes, device], max_steps=4), turns=False))
    assert turn_before(no_turns) == {} and all(b.turn == 0 for b in no_turns)


def test_the_first_turn_rotates_with_the_round():
    nodes = [serving(1, 0.2), serving(2, 0.2), serving(3, 0.2)]
    for rotation, first in [(0, 1), (1, 2), (2, 3), (3, 1)]:
        budgets = allocate(replace(inputs(nodes, max_steps=4), rotation=rotation))
        assert min(budgets, key=lambda b: b.start_after_s).node_id == first


def test_no_turns_when_the_others_could_not_carry_the_load():
    # Three replicas: the two not training may carry 2 x TURN_UTILIZATION of the serving.
    just = [serving(n, TURN_UTILIZATION * 2 / 3 - 0.01) for n in (1, 2, 3)]
    assert any(b.start_after_s > 0 for b in allocate(inputs(just, max_steps=4)))
    over = [serving(n, TURN_UTILIZATION * 2 / 3 + 0.01) for n in (1, 2, 3)]
    assert all(b.start_after_s == 0.0 for b in allocate(inputs(over, max_steps=4)))
    # ... nor when a rising forecast will make them: growth counts, as for the headroom
    rising = [serving(1, 0.2, forecast=0.8), serving(2, 0.1)]
    assert all(b.start_after_s == 0.0 for b in allocate(inputs(rising, max_steps=4)))
    steady = [serving(1, 0.2), serving(2, 0.1)]
    assert any(b.start_after_s > 0 for b in allocate(inputs(steady, max_steps=4)))


def test_no_turns_when_they_would_not_fit_the_deadline_one_after_the_other():
    nodes = [serving(1, 0.1, step_s=10.0), serving(2, 0.1, step_s=10.0)]
    fits = 2 * 4 * 10.0  # (the measured times: a turn starts when the one before replies)
    assert any(b.start_after_s > 0 for b in allocate(inputs(nodes, deadline=fits, max_steps=4)))
    late = allocate(inputs(nodes, deadline=fits - 1, max_steps=4))
    assert all(b.start_after_s == 0.0 for b in late)


def test_no_turns_before_the_steps_and_the_serving_are_measured_or_when_turned_off():
    unknown_speed = [serving(1, 0.1, step_s=None), serving(2, 0.1)]
    no_utilization = [replica(1, load(0.2), step_s=1.0), serving(2, 0.1)]
    alone = [serving(1, 0.1)]
    broken = [serving(1, float("nan")), serving(2, 0.1)]
    nonsense = [serving(1, 0.1, step_s=float("inf")), serving(2, 0.1, step_s=-1.0)]
    for nodes in (unknown_speed, no_utilization, alone, broken, nonsense):
        assert all(b.start_after_s == 0.0 for b in allocate(inputs(nodes, max_steps=4)))
    both = [serving(1, 0.1), serving(2, 0.1)]
    off = allocate(replace(inputs(both, max_steps=4), turns=False))
    assert all(b.start_after_s == 0.0 and not b.reason.startswith("turn") for b in off)
