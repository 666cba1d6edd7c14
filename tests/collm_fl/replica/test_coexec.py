"""The co-execution trainer on a real in-process replica (tiny model): yields to serving."""

import os

import numpy as np
import pytest

from collm_fl.adapters import LoraSpec
from collm_fl.data import DataSpec
from collm_fl.replica.metrics import SLO
from collm_fl.replica.requests import GenerationRequest
from collm_fl.replica.runtime import Replica, ReplicaConfig
from collm_fl.replica.sampling import SamplingParams


@pytest.fixture()
def replica(tmp_path):
    cfg = ReplicaConfig(
        model="tiny",
        store_dir=str(tmp_path / "store"),
        data=DataSpec(max_samples_per_client=30),
        num_partitions=4,
        slo=SLO(ttft_s=1e-4, tpot_s=1e-4),  # any waiting request is "at risk"
        training_share=1.0,
    )
    r = Replica(cfg)
    r.start()
    shapes = r.modules.expected_shapes()
    rng = np.random.default_rng(0)
    state = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    r.push_version(state, LoraSpec().to_peft_config_dict("tiny"), 0)
    yield r
    r.stop()


def test_idle_replica_trains_its_whole_budget(replica):
    outcome = replica.train(steps=4, learning_rate=1e-3, deadline_s=120, round_number=1)
    assert outcome.steps == 4 and not outcome.deadline_hit
    assert outcome.tokens > 0 and outcome.yields == 0
    assert outcome.state.keys() == replica.modules.expected_shapes().keys()


def test_training_yields_while_a_request_waits_past_its_slo(replica):
    replica.engine.pause()  # hold a request in the queue: its TTFT is at risk
    handle = replica.engine.submit(
        GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=4, temperature=0), "r1")
    )
    try:
        outcome = replica.train(steps=50, learning_rate=1e-3, deadline_s=1.0, round_number=1)
    finally:
        replica.engine.resume()
    assert outcome.yields > 0 and outcome.deadline_hit
    assert outcome.steps == 0  # it never took compute from the waiting request
    assert handle.wait(timeout=60) and handle.finish_reason in ("length", "stop")


def test_share_zero_means_no_training_within_the_deadline(replica):
    replica.set_training_share(0.0)
    outcome = replica.train(steps=5, learning_rate=1e-3, deadline_s=0.5, round_number=1)
    assert outcome.steps == 0 and outcome.deadline_hit


def test_the_trainer_thread_runs_below_the_serving_priority(replica):
    replica.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=1)  # thread has run
    assert replica.trainer is not None and replica.trainer._thread is not None
    trainer_tid = replica.trainer._thread.native_id
    serving = os.getpriority(os.PRIO_PROCESS, 0)  # this (test) thread's nice
    assert os.getpriority(os.PRIO_PROCESS, trainer_tid) == max(replica.cfg.trainer_nice, serving)
    assert replica.cfg.trainer_nice > 0  # the default really lowers it


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


def test_a_trainer_behind_its_plan_takes_its_share_while_a_request_waits(replica):
    assert replica.trainer is not None
    replica.train(steps=1, learning_rate=1e-3, deadline_s=120, round_number=1)  # a timed step
    replica.engine.pause()  # a request stays queued past its TTFT SLO the whole time
    handle = replica.engine.submit(
        GenerationRequest(list(range(5, 10)), SamplingParams(max_tokens=4, temperature=0), "r1")
    )
    try:
        # 10,000 planned steps cannot fit 1 s: behind schedule from the first decision.
        behind = replica.train(steps=10_000, learning_rate=1e-3, deadline_s=1.0, round_number=2)
        replica.trainer.nice = 0  # the same trainer, seen as not preemptible, keeps yielding
        held = replica.train(steps=10_000, learning_rate=1e-3, deadline_s=1.0, round_number=3)
    finally:
        replica.trainer.nice = replica.cfg.trainer_nice
        replica.engine.resume()
    assert behind.steps > 0 and behind.deadline_hit
    assert held.steps == 0 and held.yields > 0 and held.deadline_hit
    assert handle.wait(timeout=60) and handle.finish_reason in ("length", "stop")
