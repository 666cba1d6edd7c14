import pytest

from collm_fl.policies.slo_guard import GuardInputs, behind_schedule, training_decision


def inputs(**kw) -> GuardInputs:
    base = dict(
        queue_depth=0,
        running=0,
        oldest_waiting_s=0.0,
        decode_step_s=0.01,
        training_share=0.5,
        busy_fraction=0.0,
        train_step_s=0.2,
        ttft_slo_s=2.0,
        tpot_slo_s=0.2,
        total_threads=2,
    )
    return GuardInputs(**{**base, **kw})


def test_zero_share_never_trains():
    assert not training_decision(inputs(training_share=0.0)).run


def test_idle_replica_trains_with_every_thread():
    d = training_decision(inputs())
    assert d.run and d.threads == 2


def test_waiting_request_near_its_ttft_slo_makes_training_yield():
    d = training_decision(inputs(queue_depth=1, oldest_waiting_s=1.5))
    assert not d.run and d.reason == "TTFT at risk"


def test_slow_decode_makes_training_yield():
    d = training_decision(inputs(running=3, decode_step_s=0.19))
    assert not d.run and d.reason == "TPOT at risk"


def test_training_keeps_to_its_share_while_serving():
    d = training_decision(
        inputs(running=1, busy_fraction=0.6, training_share=0.5, train_step_s=0.2)
    )
    assert not d.run and d.reason == "over training share"
    assert d.wait_s == pytest.approx(0.2 * 0.5 / 0.5)


def test_within_share_and_slos_training_leaves_serving_its_core():
    d = training_decision(inputs(running=1, busy_fraction=0.2))
    assert d.run and d.threads == 1


def test_a_long_micro_step_puts_a_fresh_waiting_request_at_risk_unless_serving_preempts_it():
    # 1.7 s step + 0.1 s waited > 0.8 × 2 s: a step started now would delay admission ...
    waiting = dict(queue_depth=1, running=1, oldest_waiting_s=0.1, train_step_s=1.7)
    assert training_decision(inputs(**waiting)).reason == "TTFT at risk"
    # ... unless the trainer runs below serving's priority: admission never waits for it.
    assert training_decision(inputs(**waiting, preemptible=True)).run
    # A request that already waited past the margin is at risk either way.
    late = {**waiting, "oldest_waiting_s": 1.7}
    assert not training_decision(inputs(**late, preemptible=True)).run


def test_a_yielding_trainer_waits_before_deciding_again_even_before_its_first_step():
    # No step timed yet (train_step_s 0) must not turn yielding into a busy loop.
    for x in (
        inputs(queue_depth=1, oldest_waiting_s=1.9, train_step_s=0.0),
        inputs(running=2, decode_step_s=0.19, train_step_s=0.0),
    ):
        d = training_decision(x)
        assert not d.run and d.wait_s >= 0.01


def test_a_backfill_step_runs_only_on_an_idle_replica():
    assert training_decision(inputs(), backfill=True).run  # idle
    assert training_decision(inputs(training_share=0.0), backfill=True).run  # idle cycles are free
    busy = training_decision(inputs(running=1, busy_fraction=0.0), backfill=True)
    assert not busy.run and "backfill" in busy.reason
    assert training_decision(inputs(running=1, busy_fraction=0.0)).run  # a planned step would


def test_a_preemptible_trainer_behind_its_plan_runs_on_time_lent_by_serving():
    at_risk = dict(queue_depth=3, running=2, oldest_waiting_s=1.9, busy_fraction=0.1)
    ahead = training_decision(inputs(**at_risk, preemptible=True))
    assert ahead.reason == "TTFT at risk" and ahead.lend_share == 0.0
    d = training_decision(inputs(**at_risk, preemptible=True, behind_schedule=True))
    assert d.run and d.threads == 1 and "behind" in d.reason
    assert d.lend_share == 0.5  # serving rests for the allocation's share, no more
    # The engine's rests keep training to its share, so the wall-time duty cycle does not apply
    # (a step run on lent time is busy for its whole wall time).
    over = training_decision(
        inputs(**{**at_risk, "busy_fraction": 0.9}, preemptible=True, behind_schedule=True)
    )
    assert over.run and over.lend_share == 0.5
    # Not preemptible: a step would delay admission by its length, so it still yields.
    assert not training_decision(inputs(**at_risk, behind_schedule=True)).run
    # ... and backfill still waits for an idle replica, behind or not.
    late = inputs(**at_risk, preemptible=True, behind_schedule=True)
    assert not training_decision(late, backfill=True).run
    # Steps on an idle replica or within the SLOs do not borrow serving's time: they run on its
    # idle moments (a preemptible step gives way to requests by itself).
    assert training_decision(inputs()).lend_share == 0.0
    assert training_decision(inputs(running=1, busy_fraction=0.2)).lend_share == 0.0
    assert training_decision(inputs(running=1, preemptible=True)).lend_share == 0.0


def test_behind_schedule_compares_the_plan_left_at_the_share_with_the_time_left():
    assert behind_schedule(4, 2.0, 0.5, 20.0)  # 4 × 2 s at half the time: 16 s, 80 % of 20 s
    assert not behind_schedule(4, 2.0, 0.5, 20.1)
    assert behind_schedule(4, 2.0, 0.5, 16.0, margin=1.0)
    assert not behind_schedule(4, 2.0, 0.5, 16.1, margin=1.0)
    assert not behind_schedule(0, 2.0, 0.5, 1.0)  # nothing planned is left
    assert behind_schedule(4, 0.0, 0.5, 1e6)  # no step timed yet: run one to learn its cost
    assert not behind_schedule(4, 2.0, 0.0, 1.0)  # share 0: the plan is to sit out
