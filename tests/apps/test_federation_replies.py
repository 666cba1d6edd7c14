"""The ServerApp's round loop in-process, with a fake grid of scripted nodes: replies no honest
node sends must cost that node its round, never the run (the rule: a rejected update is logged
with its reason while the round goes on)."""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from collm_fl.config import RunConfig
from collm_fl.flower_records import PUBLISH, arrayrecord_to_state, state_to_arrayrecord
from server_app.app import build_strategies
from server_app.federation import Federation, open_store
from strategies.lora import LoraFedAvg

pytestmark = pytest.mark.slow  # (the tiny model, loaded and evaluated in-process)


@pytest.fixture(autouse=True)
def _identity(flower_task_identity):
    """Flower makes replies in a task that knows its run; the fake grid runs none."""


def honest(node: int, rnd: int, msg: Message, steps: float = 1.0) -> RecordDict:
    glob = arrayrecord_to_state(msg.content["arrays"])
    rng = np.random.default_rng(node * 100 + rnd)
    state = {
        k: (v + 1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in glob.items()
    }
    metrics = {"num-examples": 10, "train-loss": 3.0, "local-steps": steps, "train-seconds": 2.0}
    return RecordDict({"arrays": state_to_arrayrecord(state), "metrics": MetricRecord(metrics)})


class FakeGrid:
    """Answers each train message by calling the node's behaviour; publishes are acknowledged,
    except by the nodes in ``deaf``."""

    def __init__(self, behaviours):
        self.behaviours = behaviours
        self.deaf: set[int] = set()
        self.gone: set[int] = set()  # their publishes answered by the SuperLink, as node 1
        self.ack_metrics: dict[str, float] = {}  # more in each publish ack (a load report)

    def get_node_ids(self):
        return list(self.behaviours)

    def push_messages(self, messages):
        self.replies = getattr(self, "replies", {})
        ids = []
        for m in messages:
            mid = str(uuid.uuid4())
            m.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            if m.metadata.message_type == PUBLISH:
                if int(m.metadata.dst_node_id) in self.deaf:
                    continue
                if int(m.metadata.dst_node_id) in self.gone:
                    self.replies[mid] = superlink_error(0, 0, m)
                    continue
                ack_metrics = {"served-version": -1.0, **self.ack_metrics}
                ack = RecordDict({"metrics": MetricRecord(ack_metrics)})
                self.replies[mid] = Message(ack, reply_to=m)
                continue
            node = int(m.metadata.dst_node_id)
            rnd = int(m.content["config"]["server-round"])
            made = self.behaviours[node](node, rnd, m)
            self.replies[mid] = made if isinstance(made, Message) else Message(made, reply_to=m)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def federation(tmp_path, behaviours, wrap=None, **settings):
    """A Federation over the fake grid; ``wrap`` (e.g. Flower's DP wrapper) wraps its strategy."""
    cfg = RunConfig(
        model="tiny",
        output_dir=str(tmp_path / "out"),
        central_eval_samples=4,
        seq_len=32,
        batch_size=4,
        **{
            "min_train_nodes": len(behaviours),
            "num_server_rounds": 2,
            "round_timeout": 5.0,
            "round_deadline_s": 4.0,
            **settings,
        },
    )
    strategy, built = build_strategies(cfg)  # as the ServerApp builds them
    store = open_store(cfg)
    outer = built if wrap is None else wrap(strategy)
    return Federation(FakeGrid(behaviours), cfg, outer, strategy, store), store


def dp_federation(tmp_path, behaviours):
    """One round under Flower's client-side DP wrapper (noise 0.01, clipping norm 1, every node
    sampled), fedavg, the quality gate off."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    def dp(strategy: LoraFedAvg) -> DifferentialPrivacyClientSideFixedClipping:
        return DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=0.01, clipping_norm=1.0, num_sampled_clients=len(behaviours)
        )

    return federation(
        tmp_path,
        behaviours,
        wrap=dp,
        num_server_rounds=1,
        aggregation="fedavg",
        dp_noise_multiplier=0.01,
        quality_gate_margin=-1.0,
    )


def outcome(store, run_id):
    rounds = [(r.number, r.status) for r in store.list_rounds(run_id)]
    parts = {
        (p.round_number, p.node_id): (p.status, p.reason) for p in store.participations(run_id)
    }
    return store.get_run(run_id).status, rounds, parts


def test_unreadable_arrays_a_huge_example_count_and_a_made_up_speed_cost_only_their_node(tmp_path):
    def garbage(node, rnd, msg):
        reply = honest(node, rnd, msg)
        arrays = reply["arrays"]
        key = next(iter(arrays.keys()))
        a = arrays[key]
        arrays[key] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=b"not numpy")
        return reply

    def boastful(node, rnd, msg):
        reply = honest(node, rnd, msg)
        reply["metrics"]["num-examples"] = 1e19  # more than SQL's integers hold
        return reply

    def too_fast(node, rnd, msg):
        reply = honest(node, rnd, msg)
        reply["metrics"]["train-seconds"] = 5e-324  # an allocation dividing by it overflows
        return reply

    behaviours = {1: honest, 2: garbage, 3: boastful, 4: too_fast}
    fed, store = federation(tmp_path, behaviours, allocation="quality-aware")
    fed.run()
    run_id = fed.run_info.id
    status, rounds, parts = outcome(store, run_id)
    assert status == "finished" and rounds == [(1, "aggregated"), (2, "aggregated")]
    for rnd in (1, 2):
        assert parts[rnd, 1] == ("ok", None)
        assert parts[rnd, 2][0] == "rejected" and "unreadable arrays" in parts[rnd, 2][1]
        assert parts[rnd, 3][0] == "rejected" and "2^53" in parts[rnd, 3][1]
        assert parts[rnd, 4][0] == "ok"  # its update is fine; only its speed is not believed
    assert fed.coordination.nodes[4].step_seconds is None
    assert fed.coordination.nodes[1].step_seconds == 2.0


def test_a_node_cannot_set_the_servers_own_metrics(tmp_path):
    # Without DP a node claiming dp-epsilon set the run's privacy account (stored and logged),
    # and its own weight-used stayed in its participation record.
    def claims(node, rnd, msg):
        reply = honest(node, rnd, msg)
        for key, value in (("dp-epsilon", 0.5), ("steps-total", 1e6), ("weight-used", 99.0)):
            reply["metrics"][key] = value
        reply["metrics"]["train-loss"] = 1e308  # two of them average to inf
        return reply

    fed, store = federation(tmp_path, {1: claims, 2: claims})
    fed.run()
    run_id = fed.run_info.id
    for r in store.list_rounds(run_id):
        assert "dp-epsilon" not in r.metrics and r.metrics["steps-total"] == 2.0
        assert "train-loss" not in r.metrics and "weight-used" not in r.metrics
    assert all(p.metrics["weight-used"] == 10.0 for p in store.participations(run_id))
    assert all("dp-epsilon" not in v.metrics for v in store.list_versions(run_id))


def test_the_quality_gain_curve_counts_one_nodes_steps_per_round(tmp_path):
    def three_steps(node, rnd, msg):
        return honest(node, rnd, msg, steps=3.0)

    fed, store = federation(tmp_path, {1: three_steps, 2: three_steps, 3: three_steps})
    fed.run()
    rounds = store.list_rounds(fed.run_info.id)
    assert [r.metrics["steps-total"] for r in rounds] == [9.0, 9.0]
    assert [r.metrics["steps-per-node"] for r in rounds] == [3.0, 3.0]
    steps = [s for s, _ in fed.coordination.loss_history]
    assert steps == [0, 3.0, 6.0]  # the aggregate moved 3 steps a round, not 9


def test_a_node_that_connects_while_flower_waits_for_nodes_gets_its_budget(tmp_path):
    """Flower's sampling waits until min-train-nodes are connected: budgets planned before it
    missed a node that connected in the wait (it trained the plain round config, its decision
    stored nowhere)."""
    shares: dict[int, object] = {}

    def replica(node, rnd, msg):
        shares[node] = msg.content["config"].get("training-share")
        return honest(node, rnd, msg)

    fed, store = federation(
        tmp_path, {1: replica, 2: replica}, num_server_rounds=1, allocation="quality-aware"
    )
    # The start's publish finds both; the round's first look finds node 1 alone (node 2 is
    # reconnecting), and Flower's sampling waits until node 2 is back.
    seen = iter([[1, 2], [1]])
    fed.grid.get_node_ids = lambda: next(seen, [1, 2])
    fed.run()
    assert set(shares) == {1, 2} and all(isinstance(v, float) for v in shares.values()), shares
    (decision,) = store.events(fed.run_info.id, "allocation")
    assert sorted(b["node_id"] for b in decision.payload["budgets"]) == [1, 2]
    store.close()


def test_the_gain_curve_counts_only_the_steps_the_aggregate_took_in(tmp_path):
    """A reply left out (weighing 0) moved nothing; under DP the mean is over every node asked,
    so one node's 10 steps among four move the aggregate about 2.5 steps, not 10."""

    def ten(node, rnd, msg):
        return honest(node, rnd, msg, steps=10.0)

    def idle(node, rnd, msg):
        return honest(node, rnd, msg, steps=0.0)

    def unchanged(node, rnd, msg):  # claims a step, sends the global adapter back
        metrics = {"num-examples": 10, "train-loss": 3.0, "local-steps": 1.0}
        return RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(metrics)})

    fed, store = federation(tmp_path, {1: ten, 2: unchanged}, num_server_rounds=1)
    fed.run()
    (r,) = store.list_rounds(fed.run_info.id)
    assert r.status == "aggregated" and r.metrics["steps-per-node"] == 10.0
    store.close()

    fed, store = dp_federation(tmp_path / "dp", {1: ten, 2: idle, 3: idle, 4: idle})
    fed.run()
    (r,) = store.list_rounds(fed.run_info.id)
    assert r.status == "aggregated" and r.metrics["steps-per-node"] == 2.5
    store.close()


def test_a_node_that_reports_no_local_steps_counts_one_as_the_strategy_does(tmp_path):
    def silent(node, rnd, msg):
        reply = honest(node, rnd, msg)
        del reply["metrics"]["local-steps"]  # an external ClientApp need not say
        return reply

    fed, store = federation(tmp_path, {1: silent, 2: silent})
    fed.run()
    rounds = store.list_rounds(fed.run_info.id)
    assert [r.status for r in rounds] == ["aggregated", "aggregated"]
    assert [r.metrics["steps-per-node"] for r in rounds] == [1.0, 1.0]
    assert [s for s, _ in fed.coordination.loss_history] == [0, 1.0, 2.0]  # a gain curve
    store.close()


def test_an_aggregate_whose_central_loss_is_not_finite_is_never_served_gate_or_not(tmp_path):
    fed, store = federation(
        tmp_path, {1: honest, 2: honest}, num_server_rounds=2, quality_gate_margin=-1.0
    )
    real = fed.evaluator.evaluate
    calls = []

    def overflowing(state):
        ev = real(state)
        calls.append(ev.loss)
        return replace(ev, loss=math.inf) if len(calls) == 2 else ev  # (1: v0 at the start)

    fed.evaluator.evaluate = overflowing
    fed.run()
    run_id = fed.run_info.id
    status, rounds, _ = outcome(store, run_id)
    assert status == "finished" and rounds == [(1, "failed"), (2, "aggregated")]
    (event,) = store.events(run_id, "aggregation-failed")
    assert event.payload["reason"] == "the aggregate's central eval loss is inf"
    assert [v.number for v in store.list_versions(run_id)] == [0, 1]  # round 2's, not round 1's
    assert all(math.isfinite(loss) for _, loss in fed.coordination.loss_history)
    store.close()


def test_a_node_that_never_acknowledges_a_publish_holds_it_publish_timeout_not_round_timeout(
    tmp_path, caplog
):
    fed, store = federation(
        tmp_path,
        {1: honest, 2: honest},
        num_server_rounds=1,
        round_timeout=60.0,
        publish_timeout=0.5,
    )
    fed.grid.deaf = {2}  # it trains, but never answers a publish
    with caplog.at_level(logging.INFO, logger="server_app.federation"):
        fed.run()
    status, rounds, _ = outcome(store, fed.run_info.id)
    assert status == "finished" and rounds == [(1, "aggregated")]
    published = [
        re.fullmatch(r"published v(\d+) to 1/2 nodes in ([\d.]+)s", r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("published")
    ]
    assert [int(m[1]) for m in published if m] == [0, 1], caplog.text
    assert all(0.5 <= float(m[2]) < 60.0 for m in published if m)  # waited for, not a round
    store.close()


def test_a_publish_the_superlink_answered_for_a_node_names_that_node(tmp_path, caplog):
    # The SuperLink's error reply comes from node 1: the log named node 1 as the one that failed.
    fed, store = federation(tmp_path, {5: honest, 6: honest}, num_server_rounds=1)
    fed.grid.gone = {6}
    with caplog.at_level(logging.WARNING, logger="server_app.federation"):
        fed.run()
    failed = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    assert failed and all(re.match(r"publish v\d+: node 6 failed: ", m) for m in failed), failed
    store.close()


def test_a_run_resumed_with_dp_after_rounds_without_noise_reports_no_finite_epsilon(tmp_path):
    from collm_fl.privacy import epsilon_spent

    fed, store = federation(tmp_path, {1: honest, 2: honest}, num_server_rounds=1)
    fed.run()
    store.close()
    # The same run resumed with noise on: its first aggregate was released without any, which no
    # later noise makes private.
    again, store = federation(
        tmp_path,
        {1: honest, 2: honest},
        num_server_rounds=1,
        dp_noise_multiplier=1.0,
        aggregation="fedavg",
    )
    again._initial_version()
    assert again.dp_releases == [0.0]
    assert epsilon_spent(again.dp_releases, 1e-5) == float("inf")
    store.close()


def _killed_before_the_rounds_row(fed, monkeypatch) -> None:
    """Run ``fed`` killed (as a kill) when it records its first round's row: after the round's
    release and evaluation, before the row (version 0 is saved before any round)."""
    from collm_fl.store import VersionStore

    save_version = VersionStore.save_version

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt("killed")

    def save_but_a_rounds(self, *args, **kwargs):
        return crash() if kwargs.get("round") is not None else save_version(self, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(VersionStore, "record_round_result", crash)
        patched.setattr(VersionStore, "save_version", save_but_a_rounds)
        with pytest.raises(KeyboardInterrupt):
            fed.run()


def test_a_noised_release_of_a_round_that_crashed_before_its_row_still_counts(
    tmp_path, monkeypatch
):
    # The gate's event (with the noised aggregate's loss) and the log were out before the round's
    # row, which alone recorded the release: a crash between them, then a resume, redid the round
    # with fresh noise and counted one release for two.
    from collm_fl.privacy import epsilon_spent

    dp = {"dp_noise_multiplier": 1.0, "aggregation": "fedavg", "quality_gate_margin": -1.0}
    fed, store = federation(tmp_path, {1: honest, 2: honest}, num_server_rounds=1, **dp)

    _killed_before_the_rounds_row(fed, monkeypatch)
    store.close()
    again, store = federation(tmp_path, {1: honest, 2: honest}, num_server_rounds=1, **dp)
    again.run()
    assert again.dp_releases == [1.0, 1.0]  # the crashed attempt's and the redone round's
    third, store = federation(tmp_path, {1: honest, 2: honest}, num_server_rounds=1, **dp)
    third._initial_version()  # a resume counts them from the store: both, once each
    assert third.dp_releases == [1.0, 1.0]
    assert epsilon_spent(third.dp_releases, 1e-5) > epsilon_spent([1.0], 1e-5)
    store.close()


def test_a_release_without_noise_of_a_round_that_crashed_counts_when_resumed_with_dp(
    tmp_path, monkeypatch
):
    # Only noised releases were on record before the round's row: a crash in between, then a
    # resume with noise on, counted none for an aggregate that was out without any (finite ε).
    from collm_fl.privacy import epsilon_spent

    plain = {"aggregation": "fedavg", "quality_gate_margin": -1.0}
    fed, store = federation(tmp_path, {1: honest, 2: honest}, num_server_rounds=1, **plain)
    _killed_before_the_rounds_row(fed, monkeypatch)
    store.close()
    again, store = federation(
        tmp_path, {1: honest, 2: honest}, num_server_rounds=1, dp_noise_multiplier=1.0, **plain
    )
    again._initial_version()
    assert again.dp_releases == [0.0]
    assert epsilon_spent(again.dp_releases, 1e-5) == float("inf")
    store.close()


def test_a_resumed_run_takes_back_each_nodes_rate_forecast_and_speed(tmp_path):
    def busier_each_round(node, rnd, msg):
        reply = honest(node, rnd, msg)
        load = {
            "load-request-rate": 0.5 * rnd * node,
            "load-queue-depth": 0.0,
            "load-ttft-p95": 0.2,
            "load-tpot-p95": 0.05,
            "load-slo-attainment": 1.0,
            "load-window-s": 3.0,
        }
        reply["metrics"] = MetricRecord({**dict(reply["metrics"]), **load})
        return reply

    nodes = {1: busier_each_round, 2: busier_each_round}
    fed, store = federation(tmp_path, nodes, num_server_rounds=3, allocation="quality-aware")
    fed.run()
    # As round 3 left it: a rising rate's forecast, every round's step time.
    left = store.events(fed.run_info.id, "coordination-state")[-1].payload["state"]
    assert left["2"]["trend"] > 0 and left["2"]["step-seconds"] == [2.0, 2.0, 2.0]
    # and its last load report: without it a resumed replica was budgeted as a device (share 1)
    assert left["2"]["load"]["request_rate"] == 3.0 and left["2"]["load"]["utilization"] is None
    assert left == fed.coordination.snapshot()
    # What round 4 would have been given, had the run gone on (round 3's reports in its forecast).
    expected = fed.coordination.budgets(fed.cfg, [1, 2], store, fed.run_info.id, 4)
    store.close()

    again, store = federation(tmp_path, nodes, num_server_rounds=4, allocation="quality-aware")
    again._initial_version()
    assert {k: again.coordination.snapshot()[k]["step-seconds"] for k in left} == {
        k: v["step-seconds"] for k, v in left.items()
    }
    budgets = again.coordination.budgets(again.cfg, [1, 2], store, again.run_info.id, 4)
    assert budgets is not None and expected is not None
    assert all(b.reports_load and b.share < 1 for b in budgets.values())
    assert budgets == expected  # not a forecast that starts again flat, nor one report short
    # (round 3's reports inform a decision for the first time: not stale)
    assert store.events(again.run_info.id, "allocation")[-1].payload["stale-loads"] == []
    for n in (1, 2):
        assert again.coordination.nodes[n].forecast == fed.coordination.nodes[n].forecast
    store.close()
    # A load report in the resume's publish ack is fresher than the stored one: it stays.
    fresh = {
        "load-request-rate": 9.0,
        "load-queue-depth": 0.0,
        "load-ttft-p95": 0.2,
        "load-tpot-p95": 0.05,
        "load-slo-attainment": 1.0,
        "load-window-s": 3.0,
    }
    later, store = federation(tmp_path, nodes, num_server_rounds=4, allocation="quality-aware")
    later.grid.ack_metrics = fresh
    later._initial_version()
    assert later.coordination.nodes[2].load.request_rate == 9.0
    assert not later.coordination.nodes[2].load_used
    store.close()
    # Nodes that registered again (new ids): nothing of the old ids is taken back.
    third, store = federation(tmp_path, {7: busier_each_round}, num_server_rounds=4)
    third._initial_version()
    assert set(third.coordination.snapshot()) <= {"7"}
    assert third.coordination.nodes[7].forecast is None
    store.close()


def test_a_stored_state_that_is_not_one_restores_nothing_it_cannot_read():
    from server_app.coordination import CoordinationState

    state = CoordinationState()
    assert state.restore(None) == 0 and state.restore([1, 2]) == 0
    n = state.restore(
        {
            "7": {"level": float("nan"), "trend": 0.1, "step-seconds": [1.0, "x", -1, 1e-9]},
            "node-8": {"level": 1.0, "trend": 0.0},
            "9": "not an entry",
            "10": {"level": True, "trend": 0.0, "step-seconds": 3.0},
            "11": {"load": {"request_rate": 1.0, "queue_depth": 0, "ttft_p95": float("nan")}},
            "12": {
                "load": {
                    "request_rate": 1.0,
                    "queue_depth": 0,
                    "ttft_p95": 0.1,
                    "tpot_p95": 0.02,
                    "slo_attainment": 1,
                    "utilization": None,
                }
            },
        }
    )
    assert n == 4 and set(state.nodes) == {7, 10, 11, 12}
    assert state.nodes[11].load is None and state.nodes[12].load is not None
    assert state.nodes[12].load.request_rate == 1.0 and state.nodes[12].load_used
    assert state.nodes[7].forecast is None and list(state.nodes[7].step_history) == [1.0]
    assert state.nodes[10].forecast is None and state.nodes[10].step_seconds is None


def superlink_error(node: int, rnd: int, msg: Message) -> Message:
    """What the SuperLink answers for a node that stopped sending heartbeats mid-round: an
    error reply from node 1 (the SuperLink), not from the node."""
    from flwr.app import Error

    reply = Message(Error(code=1, reason="Error: Node Unavailable"), reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = 1
    return reply


def test_under_dp_a_node_that_left_mid_round_is_a_failed_node_not_a_lost_round(tmp_path):
    fed, store = dp_federation(tmp_path, {5: honest, 6: honest, 7: superlink_error})
    fed.run()
    status, rounds, parts = outcome(store, fed.run_info.id)
    assert status == "finished" and rounds == [(1, "aggregated")]
    assert parts[1, 5] == ("ok", None) and parts[1, 6] == ("ok", None)
    # Named as the node it was sent to (not the SuperLink's node 1), with the SuperLink's reason.
    assert parts[1, 7] == ("failed", "error reply: Error: Node Unavailable")
    assert (1, 1) not in parts
    assert fed.dp_releases == [0.01]  # this round's noisy aggregate was released
    store.close()


def test_under_dp_a_reply_its_client_did_not_clip_is_rejected(tmp_path):
    # Clients clip (dp_clipping_mod); one without the mod (another ClientApp, or a hostile one)
    # would enter the plain mean unclipped, beyond what the noise is calibrated for.
    def unclipped(node, rnd, msg):
        reply = honest(node, rnd, msg)
        state = arrayrecord_to_state(reply["arrays"])
        key = next(iter(state))
        state[key] = state[key] + np.float32(1.0)  # a change of norm >> the clipping norm 1
        reply["arrays"] = state_to_arrayrecord(state)
        return reply

    fed, store = federation(
        tmp_path,
        {5: honest, 6: honest, 7: unclipped},
        num_server_rounds=1,
        aggregation="fedavg",
        dp_noise_multiplier=0.01,
        dp_clipping_norm=1.0,
        quality_gate_margin=-1.0,
    )
    fed.run()
    status, rounds, parts = outcome(store, fed.run_info.id)
    assert status == "finished" and rounds == [(1, "aggregated")]
    assert parts[1, 5] == ("ok", None) and parts[1, 6] == ("ok", None)  # (their change: < 1)
    assert parts[1, 7][0] == "rejected"
    assert "over the DP clipping norm 1: its client did not clip it" in parts[1, 7][1]
    store.close()


def test_an_update_that_overflows_float32_costs_only_its_node(tmp_path):
    def overflowing(node, rnd, msg):
        reply = honest(node, rnd, msg)
        state = arrayrecord_to_state(msg.content["arrays"])  # v0: every B is 0
        for key, value in state.items():  # float64, sent as it is: A past float32, B left 0
            state[key] = np.full(value.shape, 1e39) if "lora_A" in key else value.astype(float)
        reply["arrays"] = ArrayRecord({k: Array(state[k]) for k in sorted(state)})
        return reply

    for mode in ("exact", "fedavg"):
        fed, store = federation(
            tmp_path / mode, {1: honest, 2: overflowing}, aggregation=mode, num_server_rounds=1
        )
        fed.run()
        status, rounds, parts = outcome(store, fed.run_info.id)
        assert status == "finished" and rounds == [(1, "aggregated")], mode
        assert parts[1, 2][0] == "rejected" and "magnitude 1e+39" in parts[1, 2][1]
        store.close()


def test_an_aggregate_that_is_not_finite_fails_its_round_and_the_run_goes_on(tmp_path, monkeypatch):
    import strategies.lora as lora

    real = lora.aggregate_lora_exact

    def overflowing(*args, **kwargs):
        state = real(*args, **kwargs)
        key = next(iter(state))
        state[key] = np.full(state[key].shape, 1e39)  # inf once the model's float32 holds it
        return state

    monkeypatch.setattr(lora, "aggregate_lora_exact", overflowing)
    fed, store = federation(tmp_path, {1: honest, 2: honest}, num_server_rounds=2)
    fed.run()
    run_id = fed.run_info.id
    status, rounds, _ = outcome(store, run_id)
    assert status == "finished" and rounds == [(1, "failed"), (2, "failed")]
    (first, _) = store.events(run_id, "aggregation-failed")
    assert "non-finite values" in first.payload["reason"]
    assert store.latest_version(run_id).number == 0  # v0 still served
    store.close()
