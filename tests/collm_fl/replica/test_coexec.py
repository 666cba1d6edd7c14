"""The co-execution trainer on a real in-process replica (tiny model): yields to serving."""

import itertools
import os
import time
from dataclasses import replace

import numpy as np
import pytest

from collm_fl.adapters import LoraSpec
from collm_fl.data import DataSpec
from collm_fl.errors import VersionConflictError
from collm_fl.policies.scheduling import PrefillCost
from collm_fl.policies.slo_guard import GuardInputs, training_decision
from collm_fl.replica.metrics import SLO
from collm_fl.replica.requests import GenerationRequest
from collm_fl.replica.runtime import Replica, ReplicaConfig
from collm_fl.replica.sampling import SamplingParams
from tests.collm_fl.gateway.gateway_harness import wait_for


def started_replica(tmp_path, **config) -> Replica:
    """A started tiny replica with training data, serving a small random version 0."""
    cfg = ReplicaConfig(
        model="tiny",
        store_dir=str(tmp_path / "store"),
        data=DataSpec(max_samples_per_client=30),
        num_partitions=4,
        **config,
    )
    r = Replica(cfg)
    r.start()
    shapes = r.modules.expected_shapes()
    rng = np.random.default_rng(0)
    state = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    r.push_version(state, LoraSpec().to_peft_config_dict("tiny"), 0)
    return r


@pytest.fixture()
def replica(tmp_path):
    r = started_replica(
        tmp_path,
        slo=SLO(ttft_s=1e-4, tpot_s=1e-4),  # any waiting request is "at risk"
        # ... and at once overdue, so never merely late: late work gives its turn to training
        # (see the tests at the end), overdue work does not.
        defer_limit_s=1e-4,
        training_share=1.0,
    )
    yield r
    r.stop()


@pytest.fixture()
def late_replica(tmp_path):
    """Every request is late at once (TTFT SLO 1 µs) and none overdue for a minute."""
    r = started_replica(
        tmp_path, slo=SLO(ttft_s=1e-6, tpot_s=1e-6), defer_limit_s=60.0, training_share=1.0
    )
    yield r
    r.stop()


def test_idle_replica_trains_its_whole_budget(replica):
    outcome = replica.train(steps=4, learning_rate=1e-3, deadline_s=120, round_number=1)
    assert outcome.steps == 4 and not outcome.deadline_hit
    assert outcome.tokens > 0 and outcome.yields == 0
    assert outcome.state.keys() == replica.modules.expected_shapes().keys()


def test_a_jobs_deadline_counts_from_when_it_was_submitted(replica):
    # A job queued behind another (a retry, the next round) must not train for its whole
    # deadline once it starts: here it starts 100 s after it was submitted, deadline 60 s.
    trainer = replica.trainer
    assert trainer is not None
    readings = iter([0.0])  # the submission's reading; every later one is 100 s on
    trainer.clock = lambda: next(readings, 100.0)
    try:
        outcome = replica.train(steps=2, learning_rate=1e-3, deadline_s=60, round_number=1)
    finally:
        trainer.clock = time.monotonic
    assert outcome.steps == 0 and outcome.deadline_hit


def test_a_change_while_the_trainer_decides_ends_its_wait(replica, monkeypatch):
    # The trainer read the serving state, decided to yield, then waited for the next change:
    # serving going idle between the two was lost, and the trainer slept its whole re-check
    # (up to the deadline here: the decision asks for 1000 s, the deadline is 20 s).
    from collm_fl.policies.slo_guard import GuardDecision
    from collm_fl.replica import coexec

    calls = []

    def decide(inputs, backfill=False):
        calls.append(backfill)
        if len(calls) == 1:
            replica.engine.notify_change()  # serving changes after the state was read
            return GuardDecision(False, 1, 1000.0, "queued work")
        return GuardDecision(True, 1, 0.0, "idle")

    monkeypatch.setattr(coexec, "training_decision", decide)
    outcome = replica.train(steps=1, learning_rate=1e-3, deadline_s=20, round_number=1)
    assert outcome.yields == 1 and outcome.steps == 1 and not outcome.deadline_hit


def test_wait_for_change_counts_changes_from_before_the_wait(replica):
    engine = replica.engine
    seen = engine.change_count()
    assert not engine.wait_for_change(seen, 0.0)  # nothing changed yet
    handle = engine.submit(
        GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=2, temperature=0), "r1")
    )
    assert engine.wait_for_change(seen, 30.0)  # the submission came before the wait
    assert handle.wait(timeout=60)


def test_a_steps_cost_leaves_out_its_waits_for_serving(replica, monkeypatch):
    # With more than one thread a step's cost was its wall time, waits at its layers included:
    # a burst mid-step made the next steps look too slow to fit the deadline.
    trainer = replica.trainer
    assert trainer is not None
    trainer.total_threads = 2  # (CPU time measures the cost only on one thread)
    turns = iter([False] * 20)  # serving holds the core for a while, then gives way

    def wait_for_turn(timeout: float) -> bool:
        turn = next(turns, True)
        if not turn:
            time.sleep(0.05)  # (as the real wait blocks while serving runs a step)
        return turn

    monkeypatch.setattr(replica.engine, "wait_for_training_turn", wait_for_turn)
    t0 = time.monotonic()
    assert replica.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=1).steps == 1
    wall = time.monotonic() - t0
    assert wall >= 1.0 and trainer._step_cost(2) < wall - 0.9


def test_a_replica_trains_with_the_optimizer_settings_a_device_uses(replica, monkeypatch):
    """No weight decay, as collm_fl.training (torch's AdamW default is 0.01): the server weighs
    a replica's steps and a device's alike."""
    import torch

    made: list[dict[str, object]] = []
    adamw = torch.optim.AdamW

    def recording(params, **kwargs):
        made.append(kwargs)
        return adamw(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    replica.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=1)
    assert made == [{"lr": 1e-3, "weight_decay": 0.0}]


def test_training_from_a_version_the_replica_no_longer_serves_is_refused(replica):
    # The served version is checked where the start state is read, under the push lock: a push
    # that lands between the caller's check and the read cannot change what training starts from.
    assert replica.served_version == 0
    with pytest.raises(VersionConflictError, match="not base_version 3"):
        replica.train(1, 1e-3, 120, 1, base_version=3)
    assert replica.train(1, 1e-3, 120, 1, base_version=0).steps == 1


def test_training_yields_while_a_request_waits_past_its_slo(replica):
    # A timed step first: an untimed plan counts as behind and would run on lent time.
    replica.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=1)
    replica.engine.pause()  # hold a request in the queue: its TTFT is at risk
    handle = replica.engine.submit(
        GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=4, temperature=0), "r1")
    )
    assert replica.trainer is not None
    ticks = iter(range(10_000))
    # The deadline's clock moves 5 s per reading, 20 readings to the deadline: the timed step
    # (milliseconds; seconds on a loaded machine, where a 1 s deadline once left it no room to
    # yield at all) fits the time left at every decision, so the plan is never behind and the
    # trainer keeps waiting.
    replica.trainer.clock = lambda: 5.0 * next(ticks)
    try:
        outcome = replica.train(steps=1, learning_rate=1e-3, deadline_s=100.0, round_number=2)
    finally:
        replica.trainer.clock = time.monotonic
        replica.engine.resume()
    assert outcome.yields > 0 and outcome.deadline_hit
    assert outcome.steps == 0  # it never took compute from the waiting request
    assert handle.wait(timeout=60) and handle.finish_reason in ("length", "stop")


def test_share_zero_means_no_training_within_the_deadline(replica):
    replica.set_training_share(0.0)
    outcome = replica.train(steps=5, learning_rate=1e-3, deadline_s=0.5, round_number=1)
    assert outcome.steps == 0 and outcome.deadline_hit


def test_steps_run_on_a_worker_at_the_configured_priority(tmp_path):
    r = started_replica(tmp_path, trainer_nice=19)
    try:
        assert r.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=1).steps == 1
        assert r.trainer is not None and r.trainer._worker is not None
        worker = r.trainer._worker.native_id
        assert worker is not None
        serving = os.getpriority(os.PRIO_PROCESS, 0)  # this (test) thread's nice
        assert os.getpriority(os.PRIO_PROCESS, worker) == max(19, serving)
    finally:
        r.stop()
    # By default steps run at serving's priority: they give way at every layer by themselves.
    assert ReplicaConfig().trainer_nice == 0


def test_an_idle_replica_trains_its_backfill_too(replica):
    outcome = replica.train(
        steps=2, learning_rate=1e-3, deadline_s=120, round_number=1, backfill_steps=2
    )
    assert outcome.steps == 4 and outcome.backfilled == 2 and not outcome.deadline_hit


def test_backfill_waits_while_a_request_is_served(replica):
    assert replica.trainer is not None
    replica.trainer.slo = SLO(ttft_s=1e3, tpot_s=1e3)  # planned steps may run beside the request
    replica.engine.pause()  # a request stays queued: the replica is not idle
    handle = replica.engine.submit(
        GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=4, temperature=0), "r1")
    )
    try:
        outcome = replica.train(
            steps=2, learning_rate=1e-3, deadline_s=2.0, round_number=1, backfill_steps=50
        )
    finally:
        replica.engine.resume()
    assert outcome.steps == 2 and outcome.backfilled == 0  # planned ran, backfill waited
    assert outcome.deadline_hit and outcome.yields > 0
    assert handle.wait(timeout=60) and handle.finish_reason in ("length", "stop")


def test_a_trainer_behind_its_plan_borrows_its_share_while_a_request_waits(replica, monkeypatch):
    assert replica.trainer is not None
    replica.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=1)  # a timed step
    # An engine that lends (with max_lend_share 0, the default, no plan is ever behind).
    monkeypatch.setattr(replica.engine, "max_lend_share", 0.9)
    loans: list[float] = []
    lend = replica.engine.lend_to_training
    monkeypatch.setattr(
        replica.engine, "lend_to_training", lambda share: (loans.append(share), lend(share))[1]
    )
    replica.engine.pause()  # a request stays queued past its TTFT SLO the whole time
    handle = replica.engine.submit(
        GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=4, temperature=0), "r1")
    )
    try:
        # 10,000 planned steps cannot fit 10 s: behind schedule from the first decision. (Not 1 s
        # or 3 s: on a loaded machine the timed step, the first, with its warm-up, can cost
        # seconds, and a step that does not fit the time left is not started: a CI run trained
        # 0 steps in 3 s.)
        behind = replica.train(steps=10_000, learning_rate=1e-3, deadline_s=10.0, round_number=2)
        behind_loans = len(loans)
        # One step that fits the time left at every decision is on schedule: it waits instead.
        # The deadline's clock stands still for 20 readings (the whole second left at every
        # decision, far more than a tiny-model step needs even at a small share), then jumps past
        # the deadline: no decision sees the last moments before it, when one step at the
        # share would be behind (a clock creeping up to the deadline would make the test depend
        # on how long a step takes on this machine).
        readings = itertools.chain(itertools.repeat(0.0, 20), itertools.repeat(60.0))
        replica.trainer.clock = lambda: next(readings)
        held = replica.train(steps=1, learning_rate=1e-3, deadline_s=1.0, round_number=3)
        held_loans = len(loans)
        # Lending early (--lend-early), the same plan borrows from the start: it runs at once
        # (the clock now stands still at 60 s: its whole second is left).
        replica.trainer.lend_early = True
        early = replica.train(steps=1, learning_rate=1e-3, deadline_s=1.0, round_number=4)
    finally:
        replica.trainer.lend_early = False
        replica.trainer.clock = time.monotonic
        replica.engine.resume()
    assert behind.steps > 0 and behind.deadline_hit
    # It asked serving for its share (1.0 here; the engine caps what it lends at 0.9) and ended the
    # loan with the job (a decision to wait mid-job ends it too, until the next step); the
    # trainer on schedule never borrowed.
    assert loans[0] == 1.0 and loans[behind_loans - 1] == 0.0
    assert set(loans[behind_loans:held_loans]) <= {0.0}
    assert held.steps == 0 and held.yields > 0 and held.deadline_hit
    assert early.steps == 1 and early.yields == 0 and not early.deadline_hit
    assert 1.0 in loans[held_loans:] and loans[-1] == 0.0
    assert handle.wait(timeout=60) and handle.finish_reason in ("length", "stop")


def test_the_deadline_mid_step_drops_that_step_and_keeps_the_last_finished_one(replica):
    trainer = replica.trainer
    assert trainer is not None
    now, countdown = [0.0], [0]

    def clock() -> float:  # the deadline's clock, stopped unless a step is set to trip it
        if countdown[0] > 0:
            countdown[0] -= 1
            if countdown[0] == 0:
                now[0] = 1e9  # far past any deadline
        return now[0]

    finished: list[dict[str, np.ndarray]] = []
    original = trainer._micro_step

    def micro_step(*args, **kwargs):
        if len(finished) == 2:
            # The third step: its LoRA layers check the clock once each in the forward pass and
            # again in the backward; trip it halfway through the backward.
            countdown[0] = len(trainer.modules) + len(trainer.modules) // 2
        out = original(*args, **kwargs)
        finished.append(trainer.modules.get_training_state())
        return out

    trainer.clock = clock
    trainer._micro_step = micro_step
    outcome = replica.train(steps=5, learning_rate=1e-2, deadline_s=100.0, round_number=1)
    assert outcome.steps == 2 and len(finished) == 2
    assert outcome.deadline_hit and outcome.abandoned_step
    for name, value in finished[-1].items():  # the adapter is the second step's, untouched
        np.testing.assert_array_equal(outcome.state[name], value)
    assert all(p.grad is None for p in trainer.modules.training_parameters())
    # The trainer goes on: the next round trains normally.
    trainer.clock = time.monotonic
    nxt = replica.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=2)
    assert nxt.steps == 1 and not nxt.abandoned_step


def test_planned_and_backfill_steps_take_a_late_requests_turn(late_replica):
    replica = late_replica
    replica.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=1)  # a timed step
    replica.engine.pause()  # the request stays queued, already past its TTFT SLO
    handle = replica.engine.submit(
        GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=4, temperature=0), "r1")
    )
    try:
        assert replica.engine.stats().only_late
        outcome = replica.train(
            steps=2, learning_rate=1e-3, deadline_s=120, round_number=2, backfill_steps=2
        )
    finally:
        replica.engine.resume()
    # Serving it earns no goodput either way: training did not wait for it (backfill included).
    assert outcome.steps == 4 and outcome.backfilled == 2 and outcome.yields == 0
    assert not outcome.deadline_hit
    assert handle.wait(timeout=60) and handle.finish_reason in ("length", "stop")


def test_the_engine_rests_for_training_while_its_running_requests_are_late(late_replica):
    replica = late_replica
    handle = replica.engine.submit(
        GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=400, temperature=0), "long")
    )
    next(iter(handle.events(timeout=60)))  # running: its first token came after the SLO
    outcome = replica.train(steps=3, learning_rate=1e-3, deadline_s=120, round_number=1)
    assert outcome.steps == 3 and not outcome.deadline_hit
    # The steps ran while the late request was still decoding: the engine rested for them
    # (without the rest each step would have waited for the 400-token request to end).
    assert not handle.finished and outcome.late_seconds > 0
    assert replica.engine.stats().late_rest_s >= outcome.late_seconds
    assert handle.wait(timeout=120) and handle.finish_reason in ("length", "stop")
    assert handle.num_generated > 1


def test_the_rest_ends_when_work_is_on_time_or_overdue(late_replica):
    engine = late_replica.engine

    def resting_behind_a_late_row(name: str):
        late = engine.submit(
            GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=400), name)
        )
        next(iter(late.events(timeout=60)))  # (a late request still waiting would wait on)
        engine.want_late_turn(True)  # as if a training step ran from now on
        assert engine.wait_for_training_turn(timeout=60)  # the engine rests, the late row waits
        assert not late.finished
        return late

    try:
        late = resting_behind_a_late_row("a")
        engine.ttft_slo_s = 60.0  # now on time (the rest re-checks): served beside the step
        fresh = engine.submit(
            GenerationRequest(list(range(5, 9)), SamplingParams(max_tokens=3), "fresh")
        )
        assert fresh.wait(timeout=60) and late.wait(timeout=120)
        engine.want_late_turn(False)
        engine.ttft_slo_s = 1e-6
        late = resting_behind_a_late_row("b")
        engine.defer_limit_s = 1e-4  # overdue now: served
        assert late.wait(timeout=120) and late.finish_reason in ("length", "stop")
    finally:
        engine.want_late_turn(False)


def test_a_fresh_request_predicted_to_miss_is_served_not_held_back_by_the_rest(late_replica):
    # A prefill estimate inflated (as one timed beside a training step can be) predicts that any
    # new request misses its TTFT SLO; resting for training on that prediction would keep it
    # waiting, unprefilled, for as long as training runs.
    engine = late_replica.engine
    engine.ttft_slo_s = 2.0
    engine.pause()  # a row that got its first token after the 2 s SLO: paused past it
    late = engine.submit(GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=400), "a"))
    time.sleep(2.2)  # (its age is what is tested: the time must pass)
    engine.resume()
    next(iter(late.events(timeout=60)))
    engine.want_late_turn(True)  # as if a training step ran from now on
    try:
        assert engine.wait_for_training_turn(timeout=60)  # resting behind the late row ...
        assert not late.finished  # (... not idle)
        engine._prefill_cost = PrefillCost(0.0, 1.0)  # 1 s a token: no prompt "can make it"
        fresh = engine.submit(
            GenerationRequest(list(range(5, 9)), SamplingParams(max_tokens=3), "fresh")
        )
        assert fresh.wait(timeout=30) and fresh.finish_reason in ("length", "stop")
        assert not late.finished  # served while the late row waited on
    finally:
        engine.want_late_turn(False)
        late.wait(timeout=120)


def test_overdue_or_on_time_work_is_not_given_to_training(late_replica):
    engine = late_replica.engine
    engine.want_late_turn(True)  # as if a training step ran the whole time
    try:
        engine.defer_limit_s = 1e-4  # late, but overdue at once: served
        overdue = engine.submit(
            GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=8), "overdue")
        )
        assert overdue.wait(timeout=60) and overdue.finish_reason in ("length", "stop")
        engine.defer_limit_s, engine.ttft_slo_s = 60.0, 60.0  # on time: served
        on_time = engine.submit(
            GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=8), "on-time")
        )
        assert on_time.wait(timeout=60) and on_time.finish_reason in ("length", "stop")
    finally:
        engine.want_late_turn(False)
    assert engine.stats().late_rest_s == 0.0


def test_a_job_submitted_after_the_trainer_stopped_fails_at_once(replica):
    """(A /control/train request still draining at SIGTERM reaches submit() after stop(): queued,
    nobody would ever answer it, and the replica's graceful shutdown would wait for ever.)"""
    from collm_fl.replica.coexec import TrainerStopped, TrainJob

    trainer = replica.trainer
    trainer.stop()
    job = TrainJob(start_state={}, steps=1, learning_rate=1e-3, deadline_s=60.0, round_number=1)
    fut = trainer.submit(job)
    assert fut.done()
    with pytest.raises(TrainerStopped):
        fut.result(timeout=0)


def test_a_job_with_a_start_waits_for_it_and_counts_its_deadline_from_submission(replica):
    """(The allocation's turns: a replica trains later in the round, its deadline unchanged.)"""
    trainer = replica.trainer
    started: list[float] = []
    run = trainer._run
    waiting = []

    def record(job, submitted):
        started.append(time.monotonic())
        assert trainer.running_job  # only once it starts does the replica report training
        return run(job, submitted)

    def note(*args: object) -> None:
        waiting.append(trainer.running_job)  # (logged as its wait begins)

    trainer._run = record
    try:
        submitted = time.monotonic()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("collm_fl.replica.coexec.log.info", note)
            fut = replica.submit_training(1, 1e-3, 60.0, 1, start_after_s=0.5)
            outcome = fut.result(timeout=60)
        # Its deadline counts from the submission, not from the start: a start just before it
        # leaves no time for a step.
        late = replica.submit_training(1, 1e-3, 0.6, 2, start_after_s=0.59).result(timeout=60)
    finally:
        del trainer._run
    assert outcome.steps == 1
    assert started and started[0] - submitted >= 0.5
    assert waiting and waiting[0] is False  # no training reported while it waits
    assert late.steps == 0 and late.deadline_hit


def test_a_job_waiting_for_its_start_can_be_dropped_and_the_next_one_runs(replica):
    waiting = replica.submit_training(1, 1e-3, 3600.0, 1, start_after_s=3000.0)
    assert waiting.cancel()  # nobody waits for it any more: it never runs
    outcome = replica.submit_training(1, 1e-3, 60.0, 2).result(timeout=60)
    assert outcome.steps == 1 and replica.trainer.steps_total == 1


def test_a_job_waiting_for_its_start_ends_with_the_trainer(replica):
    from collm_fl.replica.coexec import TrainerStopped

    waiting = replica.submit_training(0, 1e-3, 3600.0, 1, start_after_s=3000.0)
    replica.trainer.stop()
    with pytest.raises(TrainerStopped):  # (even a job of no step: it never started)
        waiting.result(timeout=60)


def test_a_start_is_refused_outside_the_deadline_and_for_exclusive_jobs(replica):
    from collm_fl.errors import ConfigError

    for start in (-1.0, 61.0, float("nan")):
        with pytest.raises(ConfigError, match="start_after_s"):
            replica.submit_training(1, 1e-3, 60.0, 1, start_after_s=start)
    with pytest.raises(ConfigError, match="co-executing"):
        replica.train(1, 1e-3, 60.0, 1, exclusive=True, start_after_s=5.0)


def test_a_plan_is_judged_behind_at_the_share_the_engine_will_lend_it(replica):
    # 20 planned steps of 1 s with 100 s left: on schedule at the allocation's share 0.5 (40 s
    # of borrowed time), behind at the 0.2 the engine lends at most (100 s): judged at 0.5, the
    # plan started borrowing at 50 s and fit half its steps.
    trainer = replica.trainer
    assert trainer is not None
    trainer._share, trainer._step_costs = 0.5, {1: 1.0}  # (on one thread)
    lend = replica.engine.max_lend_share
    try:
        replica.engine.max_lend_share = 0.2
        assert trainer._behind(20, 100.0)
        replica.engine.max_lend_share = 0.9  # (lends the whole share: judged at it)
        assert not trainer._behind(20, 100.0)
    finally:
        replica.engine.max_lend_share = lend


def test_a_plan_is_never_behind_while_the_engine_lends_nothing(replica):
    # max_lend_share 0 (the default): judged at the full share, the plan counted as behind (its
    # first step always did), and the guard ran the step "taking the share" (capped to nothing)
    # past its rule that a request near its TTFT SLO is left the whole machine.
    trainer = replica.trainer
    assert trainer is not None
    lend = replica.engine.max_lend_share
    at_risk = GuardInputs(
        queue_depth=1,
        running=0,
        oldest_waiting_s=0.9,  # past 0.8 × the 1-s TTFT SLO
        decode_step_s=0.01,
        training_share=0.5,
        train_step_s=0.2,
        ttft_slo_s=1.0,
        tpot_slo_s=0.2,
        total_threads=2,
    )
    try:
        replica.engine.max_lend_share = 0.0
        # No step timed yet; then 20 steps of 1 s at the share 0.5 need all the 40 s left.
        for costs in ({}, {1: 1.0}):
            trainer._share, trainer._step_costs = 0.5, costs
            behind = trainer._behind(20, 40.0)
            assert not behind
            d = training_decision(replace(at_risk, behind_schedule=behind))
            assert not d.run and d.reason == "TTFT at risk"
        replica.engine.max_lend_share = 0.5  # (one that lends: behind, it borrows its share)
        d = training_decision(replace(at_risk, behind_schedule=trainer._behind(20, 40.0)))
        assert d.run and d.lend_share == 0.5
    finally:
        replica.engine.max_lend_share = lend


def test_a_plan_is_costed_at_the_threads_a_step_behind_it_runs_on(replica):
    # Steps on both threads of an idle replica (0.6 s of wall time) and on one thread beside
    # serving (1 s of CPU time) were averaged into one cost (0.68 s): a plan borrowing for
    # one-thread steps was judged on time and a step to fit where neither held.
    trainer = replica.trainer
    assert trainer is not None
    total, lend = trainer.total_threads, replica.engine.max_lend_share
    try:
        trainer.total_threads, trainer._share, trainer._step_costs = 2, 0.5, {}
        replica.engine.max_lend_share = 0.5
        trainer._note_step(0.0, 0.6, 0.6, threads=2)  # idle: every thread
        # Only steps on both threads timed yet: a one-thread step takes at most twice as long.
        assert trainer._plan_step_cost() == pytest.approx(1.2)
        trainer._note_step(0.0, 3.0, 1.0, threads=1)  # beside serving: its CPU time
        assert trainer._step_cost(2) == pytest.approx(0.6)
        assert trainer._plan_step_cost() == pytest.approx(1.0)
        # 20 steps of 1 s at the share 0.5 need 40 s: behind with 45 s left (80 %: 36 s) ...
        assert trainer._behind(20, 45.0)
        # ... and a step lent half the core takes 2 s: it does not fit in 1.5 s.
        assert not trainer._step_fits(1.5, 0.5)
        assert trainer._step_fits(2.0, 0.5)
        # An exclusive job's step runs on every thread: 0.6 s fits in 0.7 s.
        assert not trainer._step_fits(0.7, 1.0) and trainer._step_fits(0.7, 1.0, threads=2)
    finally:
        trainer.total_threads, replica.engine.max_lend_share = total, lend


def test_a_step_whose_caller_left_stops_at_its_next_layer(replica, monkeypatch):
    # Under sustained load a step parked at a layer held the trainer until serving went idle or
    # the job's deadline passed (here 600 s), though nobody waited for its result any more.
    trainer = replica.trainer
    assert trainer is not None
    job: list = []

    def serving_keeps_the_core(timeout: float) -> bool:
        job[0].cancel()  # the caller leaves while the step waits for its turn
        return False

    monkeypatch.setattr(replica.engine, "wait_for_training_turn", serving_keeps_the_core)
    job.append(replica.submit_training(steps=3, learning_rate=1e-3, deadline_s=600, round_number=1))
    wait_for(lambda: job[0].cancelled() and not trainer.running_job, 60, "the step waited on")
    assert trainer.steps_total == 0


def test_a_non_finite_gradient_fails_the_step_before_the_weights_change(replica, monkeypatch):
    # Clipping by an infinite norm makes every factor NaN: that state was sent to the server.
    import torch

    def infinite_norm(params, max_norm, *args, **kwargs):
        return torch.tensor(float("inf"))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", infinite_norm)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        replica.train(steps=1, learning_rate=1e-3, deadline_s=60, round_number=1)
    trained = replica.modules.get_training_state()
    assert all(np.isfinite(v).all() for v in trained.values())


def test_a_later_round_supersedes_an_earlier_rounds_job_not_started(replica):
    # The round-2 job waited behind round 1's (its turn 50 s away, then its steps) and trained
    # no step before its own deadline; round 1's was answered only after its turn.
    from collm_fl.replica.coexec import JobSuperseded

    old = replica.submit_training(2, 1e-3, 60, 1, start_after_s=50)
    new = replica.submit_training(2, 1e-3, 60, 2)
    assert old.done()  # answered as the later round came, not when its turn would have
    with pytest.raises(JobSuperseded, match="round 1 was superseded by round 2"):
        old.result(timeout=0)
    outcome = new.result(timeout=45)  # (long before round 1's turn)
    assert outcome.steps == 2 and not outcome.deadline_hit


def test_a_later_round_stops_an_earlier_rounds_running_step_at_its_next_layer(replica, monkeypatch):
    trainer = replica.trainer
    assert trainer is not None
    turn = replica.engine.wait_for_training_turn
    old: list = []

    def serving_keeps_the_core_while_round_1_runs(timeout: float) -> bool:
        return turn(timeout) if old[0].done() else False

    monkeypatch.setattr(
        replica.engine, "wait_for_training_turn", serving_keeps_the_core_while_round_1_runs
    )
    old.append(replica.submit_training(3, 1e-3, 600, 1))
    wait_for(lambda: trainer.running_job, 60, "round 1's step to start")
    new = replica.submit_training(1, 1e-3, 60, 2)
    stopped = old[0].result(timeout=30)  # (its deadline is 600 s away)
    assert stopped.steps == 0 and stopped.abandoned_step and not stopped.deadline_hit
    assert new.result(timeout=60).steps == 1


def test_jobs_of_the_same_or_an_earlier_round_or_another_run_queue_as_before(replica):
    jobs = [
        replica.submit_training(1, 1e-3, 60, 2),
        replica.submit_training(1, 1e-3, 60, 2),  # (a retry)
        replica.submit_training(1, 1e-3, 60, 1),  # (late: it supersedes nothing)
    ]
    assert [j.result(timeout=60).steps for j in jobs] == [1, 1, 1]
    trainer = replica.trainer
    assert trainer is not None
    from collm_fl.replica.coexec import TrainJob

    state = replica.modules.get_training_state()
    other = trainer.submit(TrainJob(state, 1, 1e-3, 60, 1, start_after_s=0.5, run="other"))
    mine = replica.submit_training(1, 1e-3, 60, 2)
    assert other.result(timeout=60).steps == 1 and mine.result(timeout=60).steps == 1


def test_a_superseded_training_job_is_a_409_superseded(monkeypatch):
    from concurrent.futures import Future
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from collm_fl.replica.coexec import JobSuperseded
    from collm_fl.replica.control import create_control_app

    def submit_training(*args: object, **kwargs: object) -> Future:
        job: Future = Future()
        job.set_exception(JobSuperseded("the training job of round 1 was superseded by round 2"))
        return job

    replica = SimpleNamespace(
        served_version=0, training_share=0.5, submit_training=submit_training, trainer=object()
    )
    with TestClient(create_control_app(replica, "t0ken")) as client:
        r = client.post(
            "/control/train",
            json={"round": 1, "steps": 1, "learning_rate": 1e-3, "deadline_s": 60},
            headers={"Authorization": "Bearer t0ken"},
        )
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "superseded" and "superseded by round 2" in error["message"]
