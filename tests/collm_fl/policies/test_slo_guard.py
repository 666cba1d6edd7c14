from collm_fl.policies.slo_guard import GuardInputs, behind_schedule, training_decision


def inputs(**kw) -> GuardInputs:
    base = dict(
        queue_depth=0,
        running=0,
        oldest_waiting_s=0.0,
        decode_step_s=0.01,
        training_share=0.5,
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
    d = training_decision(inputs(queue_depth=1, oldest_waiting_s=1.7))  # > 80 % of 2 s
    assert not d.run and d.reason == "TTFT at risk"


def test_slow_decode_makes_training_yield():
    d = training_decision(inputs(running=3, decode_step_s=0.19))
    assert not d.run and d.reason == "TPOT at risk"


def test_within_the_slos_training_leaves_serving_its_core():
    d = training_decision(inputs(running=1))
    assert d.run and d.threads == 1


def test_a_long_micro_step_does_not_put_a_fresh_waiting_request_at_risk():
    # The step gives way at its next layer, so only the wait so far counts: 0.1 s of a 2-s SLO
    # is fine however long a step takes ...
    waiting = dict(queue_depth=1, running=1, oldest_waiting_s=0.1, train_step_s=1.7)
    assert training_decision(inputs(**waiting)).run
    # ... and a request that already waited past the margin (80 % of the SLO) is at risk.
    assert not training_decision(inputs(**{**waiting, "oldest_waiting_s": 1.7})).run


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
    busy = training_decision(inputs(running=1), backfill=True)
    assert not busy.run and "backfill" in busy.reason
    assert training_decision(inputs(running=1)).run  # a planned step would


def test_a_trainer_behind_its_plan_runs_on_time_lent_by_serving():
    at_risk = dict(queue_depth=3, running=2, oldest_waiting_s=1.9)
    ahead = training_decision(inputs(**at_risk))
    assert ahead.reason == "TTFT at risk" and ahead.lend_share == 0.0
    d = training_decision(inputs(**at_risk, behind_schedule=True))
    assert d.run and d.threads == 1 and "behind" in d.reason
    assert d.lend_share == 0.5  # serving rests for the allocation's share, no more
    # Backfill still waits for an idle replica, behind or not.
    assert not training_decision(inputs(**at_risk, behind_schedule=True), backfill=True).run
    # Steps on an idle replica or within the SLOs do not borrow serving's time: they run on its
    # idle moments (a step gives way to requests by itself).
    assert training_decision(inputs()).lend_share == 0.0
    assert training_decision(inputs(running=1)).lend_share == 0.0


def test_behind_schedule_compares_the_plan_left_at_the_share_with_the_time_left():
    assert behind_schedule(4, 2.0, 0.5, 20.0)  # 4 × 2 s at half the time: 16 s, 80 % of 20 s
    assert not behind_schedule(4, 2.0, 0.5, 20.1)
    assert behind_schedule(4, 2.0, 0.5, 16.0, margin=1.0)
    assert not behind_schedule(4, 2.0, 0.5, 16.1, margin=1.0)
    assert not behind_schedule(0, 2.0, 0.5, 1.0)  # nothing planned is left
    assert behind_schedule(4, 0.0, 0.5, 1e6)  # no step timed yet: run one to learn its cost
    assert not behind_schedule(4, 2.0, 0.0, 1.0)  # share 0: the plan is to sit out


def test_a_plan_lending_early_is_behind_until_it_is_done():
    assert behind_schedule(4, 2.0, 0.5, 1e6, early=True)  # however much time is left
    assert not behind_schedule(0, 2.0, 0.5, 1.0, early=True)  # done
    assert not behind_schedule(4, 2.0, 0.0, 1.0, early=True)  # share 0: sits out


def test_when_every_request_is_late_planned_and_backfill_steps_take_their_turn():
    late = dict(queue_depth=4, running=2, oldest_waiting_s=9.0, only_late=True)
    for backfill in (False, True):
        d = training_decision(inputs(**late), backfill=backfill)
        assert d.run and d.threads == 2 and "late" in d.reason  # the engine rests: every thread
        assert d.lend_share == 0.0  # nothing to lend: serving rests until a fresh request
    # The same queue with a request that can still make it: the TTFT risk rule holds.
    assert not training_decision(inputs(**{**late, "only_late": False})).run
    # A zero share still means no planned training (backfill may use the late time).
    assert not training_decision(inputs(**late, training_share=0.0)).run
    assert training_decision(inputs(**late, training_share=0.0), backfill=True).run
