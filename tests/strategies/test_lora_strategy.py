import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from lora_messages import SHAPES, adapter, reply, strategy

from collm_fl.aggregation import aggregate_lora_exact, aggregate_lora_fedavg
from collm_fl.flower_records import arrayrecord_to_state, state_to_arrayrecord
from strategies.allocation import NodeBudget
from strategies.lora import LoraFedAvg, aggregate_metrics


def error_reply(node: int) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type="train")
    return Message(Error(code=1, reason="ClientApp crashed"), reply_to=instruction)


@pytest.mark.parametrize("mode", ["exact", "fedavg"])
def test_aggregates_valid_replies_weighted_by_examples(mode):
    s = strategy(mode=mode)
    states = [adapter(1), adapter(2)]
    arrays, metrics = s.aggregate_train(1, [reply(1, states[0], 10), reply(2, states[1], 30)])
    got = arrayrecord_to_state(arrays)
    fn = aggregate_lora_exact if mode == "exact" else aggregate_lora_fedavg
    expected = fn(states, [10, 30])
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx((1.1 * 10 + 1.2 * 30) / 40)
    assert s.last_report.count("ok") == 2


def test_bad_replies_are_rejected_with_reasons_and_the_round_completes():
    s = strategy(max_update_norm=5.0)
    good = adapter(1)
    nan = adapter(2)
    nan[next(iter(SHAPES))][0, 0] = np.nan
    wrong_shape = adapter(3)
    wrong_shape[next(iter(SHAPES))] = np.zeros((3, 8), np.float32)
    missing = adapter(4)
    del missing[list(SHAPES)[2]]
    huge = {k: v * 1000 for k, v in adapter(5).items()}
    replies = [
        reply(1, good),
        reply(2, nan),
        reply(3, wrong_shape),
        reply(4, missing),
        reply(5, huge),
        reply(6, adapter(6), num_examples=0),
        error_reply(7),
        reply(8, adapter(8), num_examples=float("inf")),
        reply(9, adapter(9), num_examples=0.5),
    ]
    arrays, _ = s.aggregate_train(3, replies)
    # Only the good update is in the aggregate.
    got = arrayrecord_to_state(arrays)
    expected = aggregate_lora_exact([good], [1.0])
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[1].status == "ok"
    assert "non-finite" in by_node[2].reason
    assert "shape" in by_node[3].reason
    assert "missing" in by_node[4].reason
    assert "norm" in by_node[5].reason
    assert "num-examples" in by_node[6].reason
    assert by_node[7].status == "failed" and "crashed" in by_node[7].reason
    assert "num-examples" in by_node[8].reason and "num-examples" in by_node[9].reason
    assert s.last_report.count("rejected") == 7


def test_too_few_good_replies_keep_the_previous_version():
    s = strategy(min_good_replies=2)
    bad = {k: np.full(v.shape, np.inf, np.float32) for k, v in adapter(1).items()}
    arrays, metrics = s.aggregate_train(2, [reply(1, adapter(2)), reply(2, bad)])
    assert arrays is None and metrics is None
    assert not s.last_report.aggregated


def test_configure_train_does_not_mutate_the_callers_config():
    class OneNodeGrid:
        def get_node_ids(self):
            return [11]

    s = LoraFedAvg(min_train_nodes=1, min_available_nodes=1)
    config = ConfigRecord({"local-steps": 3})
    msgs = list(s.configure_train(4, state_to_arrayrecord(adapter(0)), config, OneNodeGrid()))
    assert dict(config) == {"local-steps": 3}
    assert msgs[0].content["config"]["server-round"] == 4
    assert msgs[0].metadata.dst_node_id == 11


def test_a_reply_that_trained_no_steps_is_kept_out_of_the_average():
    s = strategy()
    trained, idle = adapter(1), adapter(0)  # idle: the global state sent back unchanged
    arrays, _ = s.aggregate_train(
        1,
        [
            reply(1, trained, 10, {"local-steps": 3.0}),
            reply(2, idle, 10, {"local-steps": 0.0}),
        ],
    )
    got = arrayrecord_to_state(arrays)
    alone = aggregate_lora_exact([trained], [10])  # as if node 2 had not answered
    for k, v in alone.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)  # not diluted by node 2
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[2].status == "ok" and by_node[2].weight_used == 0.0
    assert "0 steps" in by_node[2].reason


def test_updates_of_different_steps_are_averaged_as_fednova_does():
    """The mean of the per-step updates, moved the examples-weighted mean number of steps: an
    update cut short does not pull the average back toward the old version."""
    s = strategy(max_weight_ratio=2.0)
    reference = adapter(0)
    full, short, silent = adapter(1), adapter(2), adapter(3)
    arrays, _ = s.aggregate_train(
        1,
        [
            reply(1, full, 10, {"local-steps": 4.0}),
            reply(2, short, 10, {"local-steps": 1.0}),  # a deadline or a busy replica's budget
            reply(3, silent, 100, {"local-steps": 2.0}),  # claims 100: capped to 20
        ],
    )
    got = arrayrecord_to_state(arrays)
    # By hand: p = (10, 10, 20)/40, tau = (4, 1, 2); weights ∝ p/tau = (1/16, 1/4, 1/4) / S
    # with S = 9/16, and the server step (Σ p·tau)(S) = (2.25)(0.5625) = 1.265625.
    weights = [1 / 16 / 0.5625, 0.25 / 0.5625, 0.25 / 0.5625]
    expected = aggregate_lora_exact(
        [full, short, silent], weights, server_lr=1.265625, reference=reference
    )
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6)
    assert [o.weight_used for o in s.last_report.outcomes] == [10.0, 10.0, 20.0]
    shares = [o.mean_share for o in s.last_report.outcomes]
    np.testing.assert_allclose(shares, weights)  # what the mean used, after the normalization
    assert "capped to 20" in s.last_report.outcomes[2].reason
    from server_app.federation import participation_record

    stored = participation_record(s.last_report.outcomes[1]).metrics
    assert stored["weight-used"] == 10.0 and stored["mean-share"] == shares[1]


def test_equal_or_unknown_steps_leave_fedavg_as_it_was():
    from collm_fl.aggregation import step_normalized

    assert step_normalized([10, 30], [5.0, 5.0]) == ([10.0, 30.0], 1.0)
    assert step_normalized([10, 30], [None, 3.0]) == ([10.0, 30.0], 1.0)  # one does not say
    weights, scale = step_normalized([10, 10], [3.0, 9.0])
    assert weights == pytest.approx([0.75, 0.25]) and scale == pytest.approx(
        6 * (0.5 / 3 + 0.5 / 9)
    )
    with pytest.raises(ValueError, match="step counts"):
        step_normalized([10], [1.0, 2.0])


def test_a_tiny_step_claim_cannot_take_over_the_mean_or_the_server_step():
    """Dividing by a node's own step count is a lever: 1e-6 steps would make its update the
    whole mean and the step as long as allowed. A claim counts as at least the most / 4."""
    from collm_fl.aggregation import MAX_STEP_RATIO, step_normalized

    liar, scale = step_normalized([10, 10, 10], [1e-6, 10.0, 10.0])
    honest_short, same = step_normalized([10, 10, 10], [2.5, 10.0, 10.0])
    assert liar == pytest.approx(honest_short) and scale == pytest.approx(same)
    # Its coefficient on the step is at most MAX_STEP_RATIO times FedAvg's (1/3 each).
    assert liar[0] * scale <= MAX_STEP_RATIO / 3 + 1e-12
    assert scale <= MAX_STEP_RATIO


def test_backfill_budgets_reach_the_node_and_one_that_sits_out_is_asked_for_0_steps():
    from strategies.allocation import NodeBudget

    class Grid:
        def get_node_ids(self):
            return [11, 12, 13]

    s = LoraFedAvg(min_train_nodes=1, min_available_nodes=3)
    s.node_budgets = {
        11: NodeBudget(11, 2, 0.4, 30.0, "busy", backfill_steps=3, start_after_s=7.5),
        12: NodeBudget(12, 0, 0.1, 30.0, "nothing fits", backfill_steps=5),  # idle cycles only
        13: NodeBudget(13, 0, 0.0, 30.0, "sits out"),
    }
    msgs = list(s.configure_train(2, state_to_arrayrecord(adapter(0)), ConfigRecord({}), Grid()))
    sent = {int(m.metadata.dst_node_id): m.content["config"] for m in msgs}
    assert sorted(sent) == [11, 12, 13]
    assert sent[11]["local-steps"] == 2 and sent[11]["backfill-steps"] == 3
    assert sent[11]["start-after-s"] == 7.5 and sent[12]["start-after-s"] == 0.0  # (turns)
    assert sent[12]["local-steps"] == 0 and sent[12]["backfill-steps"] == 5
    # Sitting out, still asked (for 0 steps): its reply carries the load report the next
    # round's allocation needs.
    assert sent[13]["local-steps"] == 0 and sent[13]["backfill-steps"] == 0
    # A device no step of which fits sends no load report: it is not asked.
    s.node_budgets[13] = NodeBudget(13, 0, 1.0, 30.0, "device", reports_load=False)
    msgs = list(s.configure_train(3, state_to_arrayrecord(adapter(0)), ConfigRecord({}), Grid()))
    assert sorted(int(m.metadata.dst_node_id) for m in msgs) == [11, 12]


@pytest.mark.parametrize("mode", ["exact", "fedavg"])
def test_server_lr_steps_from_the_global_adapter_the_round_sent(mode):
    s = strategy(mode=mode, server_lr=2.0)
    reference = arrayrecord_to_state(s.current_arrays)
    states = [adapter(1), adapter(2)]
    arrays, _ = s.aggregate_train(1, [reply(1, states[0], 10), reply(2, states[1], 30)])
    fn = aggregate_lora_exact if mode == "exact" else aggregate_lora_fedavg
    expected = fn(states, [10, 30], server_lr=2.0, reference=reference)
    plain = fn(states, [10, 30])
    got = arrayrecord_to_state(arrays)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(got[k], plain[k]) for k in plain)  # the step is not FedAvg


def test_server_lr_also_applies_to_a_robust_aggregate():
    s = strategy(robust="median", server_lr=2.0)
    plain = strategy(robust="median")
    replies = [reply(n, adapter(n), 10) for n in (1, 2, 3)]
    got = arrayrecord_to_state(s.aggregate_train(1, replies)[0])
    median = arrayrecord_to_state(plain.aggregate_train(1, replies)[0])
    reference = arrayrecord_to_state(s.current_arrays)
    expected = aggregate_lora_exact([median], [1.0], server_lr=2.0, reference=reference)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, -1.0, 100.0])
def test_a_bad_server_lr_is_refused_at_construction(eta):
    with pytest.raises(ValueError, match="server_lr"):
        LoraFedAvg(server_lr=eta)


@pytest.mark.parametrize("bound", [-1.0, float("nan"), float("inf")])
def test_a_bad_update_norm_bound_is_refused_at_construction(bound):
    with pytest.raises(ValueError, match="max_update_norm"):
        LoraFedAvg(max_update_norm=bound)


def test_a_round_the_dp_wrapper_refuses_is_reported_as_that_round_with_its_failure():
    lora = strategy()
    dp = DifferentialPrivacyClientSideFixedClipping(
        lora, noise_multiplier=0.1, clipping_norm=1.0, num_sampled_clients=2
    )
    dp.aggregate_train(1, [reply(1, adapter(1)), reply(2, adapter(2))])
    replies = [reply(1, adapter(3)), error_reply(2)]
    lora.last_report = None  # as the ServerApp does before each round
    arrays, _ = dp.aggregate_train(2, replies)
    assert arrays is None and lora.last_report is None  # Flower skipped the inner strategy
    report = lora.report_unaggregated(2, replies)
    assert (report.server_round, report.aggregated) == (2, False)
    by_node = {o.node_id: o for o in report.outcomes}
    assert by_node[2].status == "failed" and "crashed" in by_node[2].reason
    # The valid reply is ok (weighing 0), not "rejected"; the round's failure says why.
    assert by_node[1].status == "ok" and by_node[1].weight_used == 0.0
    assert "not aggregated" in by_node[1].reason
    assert report.failure is not None and "1 failed" in report.failure


def test_a_round_the_dp_wrapper_refuses_still_names_an_invalid_update_and_why():
    lora = strategy()
    dp = DifferentialPrivacyClientSideFixedClipping(
        lora, noise_multiplier=0.1, clipping_norm=1.0, num_sampled_clients=3
    )
    bad = adapter(4)
    bad[next(iter(bad))][0, 0] = np.nan
    replies = [reply(1, adapter(3)), reply(3, bad), error_reply(2)]
    lora.last_report = None
    assert dp.aggregate_train(1, replies)[0] is None
    by_node = {o.node_id: o for o in lora.report_unaggregated(1, replies).outcomes}
    assert by_node[3].status == "rejected" and "non-finite" in by_node[3].reason
    assert by_node[1].status == "ok"


def test_a_reply_whose_arrays_cannot_be_read_is_rejected_and_the_round_goes_on():
    from flwr.app import Array, ArrayRecord, MetricRecord

    garbage = ArrayRecord(
        {
            k: Array(dtype="float32", shape=tuple(v), stype="numpy.ndarray", data=b"not numpy")
            for k, v in SHAPES.items()
        }
    )
    wrong_stype = ArrayRecord(
        {
            k: Array(dtype="float32", shape=tuple(v), stype="torch.Tensor", data=b"x")
            for k, v in SHAPES.items()
        }
    )
    replies = [reply(1, adapter(1)), reply(2, adapter(2)), reply(3, adapter(3))]
    for node, arrays in ((2, garbage), (3, wrong_stype)):
        metrics = MetricRecord({"num-examples": 10.0})
        replies[node - 1] = Message(
            RecordDict({"arrays": arrays, "metrics": metrics}),
            reply_to=Message(RecordDict({}), dst_node_id=node, message_type="train"),
        )
    s = strategy()
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None  # node 1's update alone
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[1].status == "ok"
    for node in (2, 3):
        assert by_node[node].status == "rejected"
        assert "unreadable arrays" in by_node[node].reason


def test_a_reply_of_arrays_of_the_wrong_shape_is_refused_before_it_is_decoded(monkeypatch):
    # A correctly named key holding a huge array (or a key of its own) was decoded and scanned
    # whole before its shape was compared: the description says enough.
    from flwr.app import Array, ArrayRecord, MetricRecord

    import strategies.lora as lora

    decoded: list[int] = []
    real = lora.arrayrecord_to_state
    monkeypatch.setattr(lora, "arrayrecord_to_state", lambda r: decoded.append(1) or real(r))
    first = next(iter(SHAPES))
    huge = {k: Array(np.zeros(v, np.float32)) for k, v in SHAPES.items()}
    huge[first] = Array(dtype="float32", shape=(100_000, 100_000), stype="numpy.ndarray", data=b"")
    extra = {k: Array(np.zeros(v, np.float32)) for k, v in SHAPES.items()}
    extra["base_model.model.lm_head.weight"] = Array(np.zeros((3, 3), np.float32))
    replies = [reply(1, adapter(1))]
    for node, arrays in ((2, huge), (3, extra)):
        replies.append(
            Message(
                RecordDict(
                    {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10.0})}
                ),
                reply_to=Message(RecordDict({}), dst_node_id=node, message_type="train"),
            )
        )
    s = strategy()
    decoded.clear()
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[2].status == by_node[3].status == "rejected"
    assert f"{first}: shape (100000, 100000) != expected {SHAPES[first]}" in by_node[2].reason
    assert "unexpected key 'base_model.model.lm_head.weight'" in by_node[3].reason
    assert len(decoded) == 2  # the reference and node 1's update: neither refused reply


def test_a_second_reply_from_a_node_in_a_round_is_not_aggregated_again():
    s = strategy(mode="fedavg")
    arrays, _ = s.aggregate_train(
        1, [reply(1, adapter(1)), reply(2, adapter(2)), reply(1, adapter(9))]
    )
    assert arrays is not None
    assert sorted(o.node_id for o in s.last_report.outcomes) == [1, 2]
    once = strategy(mode="fedavg")
    expected, _ = once.aggregate_train(1, [reply(1, adapter(1)), reply(2, adapter(2))])
    for k, v in arrayrecord_to_state(expected).items():
        np.testing.assert_array_equal(arrayrecord_to_state(arrays)[k], v)


@pytest.mark.parametrize("claim", [1e19, 1.7e308])
def test_an_example_count_no_float_counts_exactly_is_rejected(claim):
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply(1, adapter(1)), reply(2, adapter(2), claim)])
    assert arrays is not None
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[2].status == "rejected" and "2^53" in by_node[2].reason
    assert by_node[1].status == "ok"


def test_under_uniform_weights_every_reply_weighs_one_and_an_idle_one_is_a_zero_update():
    # Flower's DP noise is calibrated for the plain mean of the clipped updates: claims cannot
    # buy weight, and a node that trained nothing still counts (its update is zero).
    s = strategy(mode="fedavg", uniform_weights=True, max_weight_ratio=2.0)
    trained, other, idle = adapter(1), adapter(2), adapter(0)  # idle: the global state unchanged
    arrays, metrics = s.aggregate_train(
        1,
        [
            reply(1, trained, 10, {"local-steps": 3.0}),
            reply(2, other, 1000, {"local-steps": 3.0}),
            reply(3, idle, 10, {"local-steps": 0.0}),
        ],
    )
    got = arrayrecord_to_state(arrays)
    mean = aggregate_lora_fedavg([trained, other, idle], [1.0, 1.0, 1.0])
    for k, v in mean.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)
    assert [o.weight_used for o in s.last_report.outcomes] == [1.0, 1.0, 1.0]
    assert all(o.reason is None for o in s.last_report.outcomes)  # nothing capped or left out
    assert metrics["train-loss"] == pytest.approx((1.1 + 1.2) / 2)  # the idle one trained none


def test_under_uniform_weights_a_rejected_or_silent_node_counts_as_a_zero_update():
    # Otherwise one good reply would be released alone, with noise meant for a mean over three.
    s = strategy(mode="fedavg", uniform_weights=True)
    s._asked = {1: 5, 2: 5, 3: 5}  # as configure_train records it
    nan = adapter(2)
    nan[next(iter(SHAPES))][0, 0] = np.nan
    arrays, _ = s.aggregate_train(1, [reply(1, adapter(1)), reply(2, nan)])  # node 3: silent
    got = arrayrecord_to_state(arrays)
    mean = aggregate_lora_fedavg([adapter(1), adapter(0), adapter(0)], [1.0, 1.0, 1.0])
    for k, v in mean.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)
    assert sorted(o.status for o in s.last_report.outcomes) == ["failed", "ok", "rejected"]


def test_configure_train_records_the_steps_each_node_was_asked_for():
    class Grid:
        def get_node_ids(self):
            return [11, 12]

    s = strategy()
    s.node_budgets = {
        11: NodeBudget(11, steps=3, share=0.5, deadline_s=60, reason="busy", backfill_steps=4),
        12: NodeBudget(12, steps=0, share=0.1, deadline_s=60, reason="no headroom"),
    }
    config = ConfigRecord({"local-steps": 10})
    msgs = list(s.configure_train(1, state_to_arrayrecord(adapter(0)), config, Grid()))
    # 12 sits out: asked for 0 steps (its reply brings its load report), with DP or without.
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]  # (sampled in any order)
    assert s._asked == {11: 7, 12: 0}
    dp = strategy(mode="fedavg", uniform_weights=True)
    dp.node_budgets = s.node_budgets
    msgs = list(dp.configure_train(1, state_to_arrayrecord(adapter(0)), config, Grid()))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]
    assert dp._asked == {11: 7, 12: 0}


def test_bad_metrics_reject_the_reply_and_the_round_goes_on():
    s = strategy()
    five = {"local-steps": 5.0}
    s._asked = {n: 5 for n in range(1, 6)}  # as configure_train records it: 5 steps asked
    replies = [
        reply(1, adapter(1), 10, five),
        reply(2, adapter(2), 10, {"local-steps": float("nan")}),
        reply(3, adapter(3), 10, {"local-steps": 1e9}),  # more steps than asked for
        reply(4, adapter(4), 10, {"train-loss": [3.0, 3.0]}),
        reply(5, adapter(5), 10, {"train-loss": float("inf")}),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics["train-loss"] == pytest.approx(1.1)
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[1].status == "ok"
    assert "'local-steps' must be finite" in by_node[2].reason
    assert "local-steps must be in [0, 5] (the steps asked for), got 1e+09" in by_node[3].reason
    assert "'train-loss' must be a number" in by_node[4].reason
    assert "'train-loss' must be finite" in by_node[5].reason
    assert s.last_report.count("rejected") == 4


def test_a_metric_some_nodes_do_not_send_is_the_mean_of_those_that_do():
    got = aggregate_metrics(
        [{"train-loss": 3.0, "load-request-rate": 2.0}, {"train-loss": 1.0}], [1.0, 3.0]
    )
    assert got["train-loss"] == pytest.approx(1.5)  # weighted over both
    assert got["load-request-rate"] == pytest.approx(2.0)  # only the replica sent it


def test_an_aggregation_that_fails_numerically_keeps_the_previous_version(monkeypatch):
    import strategies.lora as lora

    def fails(*_a, **_k):
        raise np.linalg.LinAlgError("eigh failed to converge")

    monkeypatch.setattr(lora, "aggregate_lora_exact", fails)
    s = strategy()
    arrays, metrics = s.aggregate_train(1, [reply(1, adapter(1)), reply(2, adapter(2))])
    assert arrays is None and metrics is None
    assert not s.last_report.aggregated
    assert s.last_report.failure == "aggregation failed: eigh failed to converge"


def test_a_node_whose_message_was_not_delivered_fails_with_that_reason():
    s = strategy()
    s._asked = {1: None, 2: None, 3: None}
    s.not_delivered = {3}
    s.aggregate_train(1, [reply(1, adapter(1))])
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[2].reason == "no reply within the round timeout"
    assert by_node[3].status == "failed" and by_node[3].reason.startswith("not delivered")
    assert s.not_delivered == set()  # for this round only


def test_fedavg_mode_rejects_a_rescaled_update_that_the_product_norm_cannot_see():
    reference = adapter(0)
    honest = [adapter(10 + i, scale=0.1) for i in range(4)]
    honest = [{k: reference[k] + 0.01 * v for k, v in h.items()} for h in honest]
    c = 1e3  # (B/c, A*c): the same product change as a small update, a huge factor change
    base = {k: reference[k] + 0.01 * v for k, v in adapter(20).items()}
    attacker = {k: (v * c if "lora_A" in k else v / c) for k, v in base.items()}
    s = strategy(mode="fedavg", max_update_norm=1.0)
    replies = [reply(i + 1, h) for i, h in enumerate(honest)] + [reply(5, attacker)]
    arrays, _ = s.aggregate_train(1, replies)
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[5].status == "rejected" and "factor change" in by_node[5].reason
    assert all(by_node[n].status == "ok" for n in range(1, 5))
    expected = aggregate_lora_fedavg(honest, [10.0] * 4)
    for k, v in arrayrecord_to_state(arrays).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-6)
    # Exact mode bounds what it averages (the products): no such rejection there.
    exact = strategy(mode="exact", max_update_norm=1.0)
    exact.aggregate_train(1, replies)
    assert all(o.status == "ok" for o in exact.last_report.outcomes)
    # Two replies (DP's default min-train-nodes): the rescaled one is still found.
    s = strategy(mode="fedavg", max_update_norm=1.0)
    arrays, _ = s.aggregate_train(1, [reply(1, honest[0]), reply(5, attacker)])
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[5].status == "rejected" and by_node[1].status == "ok"
    for k, v in arrayrecord_to_state(arrays).items():
        np.testing.assert_allclose(v, honest[0][k], rtol=1e-5, atol=1e-6)
    # Not under uniform weights (DP): judged against the others' median, one node would decide
    # whether another counts, beyond the C / nodes the noise is calibrated for (clipping bounds
    # the factors there). Nor under a robust statistic: it combines the products B·A.
    for other in (
        strategy(mode="fedavg", max_update_norm=1.0, uniform_weights=True),
        strategy(mode="fedavg", max_update_norm=1.0, robust="median"),
    ):
        other.aggregate_train(1, replies)
        assert all(o.status == "ok" for o in other.last_report.outcomes)


def test_uniform_weights_need_the_plain_mean():
    for bad in ({"mode": "exact"}, {"robust": "median"}, {"server_lr": 2.0}):
        with pytest.raises(ValueError, match="uniform_weights"):
            strategy(**{"mode": "fedavg", **bad}, uniform_weights=True)


def test_a_superlink_error_reply_is_credited_to_the_node_its_message_went_to():
    s = strategy()
    s._asked = {5: None, 6: None}
    gone = error_reply(6)
    gone.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node that left
    # (its own message id: the test messages all answer "", which would credit node 5's reply
    # to node 6 too)
    gone.metadata.__dict__["_reply_to_message_id"] = "to-6"
    s.recipients = {"to-6": 6}
    s.aggregate_train(1, [reply(5, adapter(1)), gone])
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert set(by_node) == {5, 6}
    assert by_node[6].status == "failed" and "crashed" in by_node[6].reason
    assert s.recipients == {}  # for this round only


def test_under_uniform_weights_a_round_where_too_few_nodes_trained_releases_nothing():
    s = strategy(uniform_weights=True, mode="fedavg", min_good_replies=2)
    idle = [reply(n, adapter(0), extra_metrics={"local-steps": 0.0}) for n in (1, 2)]
    arrays, metrics = s.aggregate_train(1, idle)
    assert arrays is None and metrics is None and not s.last_report.aggregated
    one = [reply(1, adapter(1), extra_metrics={"local-steps": 2.0}), idle[1]]
    # One trained, fewer than min-good-replies=2: kept, as without DP (counting the zero update,
    # one node's update halved and noised was released).
    arrays, _ = s.aggregate_train(2, one)
    assert arrays is None and not s.last_report.aggregated
    arrays, _ = strategy(uniform_weights=True, mode="fedavg").aggregate_train(2, one)
    assert arrays is not None  # at min-good-replies=1: the mean of it and a zero update


def test_fedavg_factor_screening_judges_per_step_and_only_nodes_that_trained():
    reference = adapter(0)

    def moved(seed: int, steps: float) -> dict[str, np.ndarray]:
        return {k: reference[k] + 0.01 * steps * v for k, v in adapter(seed).items()}

    # One node trained 10 steps beside nodes that trained 1: a factor change 10x theirs, no outlier.
    s = strategy(mode="fedavg", max_update_norm=1.0)
    replies = [
        reply(n, moved(n, steps), extra_metrics={"local-steps": steps})
        for n, steps in ((1, 1.0), (2, 1.0), (3, 10.0))
    ]
    s.aggregate_train(1, replies)
    assert all(o.status == "ok" for o in s.last_report.outcomes)
    # Under DP two idle nodes (zero updates) do not make the one that trained an outlier.
    dp = strategy(mode="fedavg", max_update_norm=1.0, uniform_weights=True)
    idle = [reply(n, reference, extra_metrics={"local-steps": 0.0}) for n in (1, 2)]
    arrays, _ = dp.aggregate_train(
        1, [*idle, reply(3, moved(3, 2.0), extra_metrics={"local-steps": 2.0})]
    )
    assert arrays is not None and all(o.status == "ok" for o in dp.last_report.outcomes)


def test_one_update_alone_takes_no_server_step():
    s = strategy(server_lr=3.0)
    alone = adapter(1)
    arrays, _ = s.aggregate_train(1, [reply(1, alone)])
    for k, v in arrayrecord_to_state(arrays).items():
        np.testing.assert_allclose(v, aggregate_lora_exact([alone], [1.0])[k], rtol=1e-5, atol=1e-6)
    two = [adapter(1), adapter(2)]
    arrays, _ = s.aggregate_train(2, [reply(1, two[0]), reply(2, two[1])])
    expected = aggregate_lora_exact(two, [10, 10], server_lr=3.0, reference=adapter(0))
    for k, v in arrayrecord_to_state(arrays).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-4, atol=1e-5)


def test_under_uniform_weights_a_zero_step_reply_is_a_zero_update_whatever_it_sent():
    # It stays in the mean (DP's noise counts every node asked), as the reference: a node that
    # trained nothing moves nothing, even if its arrays (within the clipping norm) would.
    s = strategy(mode="fedavg", uniform_weights=True, clipping_norm=10.0)
    trained, sneaky = adapter(1), adapter(7)
    arrays, _ = s.aggregate_train(
        1,
        [reply(1, trained, 10, {"local-steps": 3.0}), reply(2, sneaky, 10, {"local-steps": 0.0})],
    )
    got = arrayrecord_to_state(arrays)
    mean = aggregate_lora_fedavg([trained, adapter(0)], [1.0, 1.0])
    for k, v in mean.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)
    assert [o.status for o in s.last_report.outcomes] == ["ok", "ok"]


def test_under_dp_a_reply_within_the_clipping_slack_is_clipped_to_the_norm_on_the_server():
    # Accepted (float32 rounding of a clipped change can put it a hair over C), but averaged as
    # clipped to C: the noise is sized for C / nodes, not for C·(1 + slack).
    from collm_fl.aggregation import factor_delta_norm

    reference = adapter(0)
    delta = {k: adapter(3)[k] - reference[k] for k in reference}
    norm = float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta.values())))
    c = norm / (1 + 5e-4)  # the reply is 0.05 % over C: within CLIP_SLACK (0.1 %)
    s = strategy(mode="fedavg", uniform_weights=True, clipping_norm=c)
    arrays, _ = s.aggregate_train(1, [reply(1, adapter(3), 10, {"local-steps": 2.0})])
    assert s.last_report.outcomes[0].status == "ok"
    moved = factor_delta_norm(arrayrecord_to_state(arrays), reference)
    assert moved == pytest.approx(c, rel=1e-6) and moved < norm * (1 - 4e-4)


def test_a_robust_round_of_fewer_than_three_updates_keeps_the_previous_version(caplog):
    # Of two updates no statistic can outvote one: their weighted mean would be published, the
    # defence off exactly when nodes dropped out. (min-train-nodes is a floor, not the count of
    # nodes: a run of 2 may sample 5, so it is said at the start, not refused.)
    with caplog.at_level("WARNING", logger="strategies.lora"):
        s = strategy(robust="median")
    assert (
        "robust-aggregation=median with min-train-nodes=1: a round of fewer than 3" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="strategies.lora"):
        arrays, _ = s.aggregate_train(1, [reply(1, adapter(1)), reply(2, adapter(2))])
    assert arrays is None and not s.last_report.aggregated
    assert "robust-aggregation=median needs 3 to outvote one" in caplog.text
    arrays, _ = s.aggregate_train(2, [reply(n, adapter(n)) for n in (1, 2, 3)])
    assert arrays is not None and s.last_report.aggregated


def test_replies_that_claim_steps_and_change_nothing_are_left_out_as_idle_ones_are():
    # Two nodes claim steps and send the global adapter back: a median of 0 made fedavg's factor
    # screen limit 0 and rejected both honest replies (the "aggregate" then was the old adapter,
    # published anew); and they diluted the mean. Left out, as replies that trained 0 steps are.
    reference = adapter(0)
    honest = [{k: reference[k] + 0.01 * v for k, v in adapter(10 + i).items()} for i in range(2)]
    s = strategy(mode="fedavg", max_update_norm=1.0)
    replies = [reply(1, honest[0]), reply(2, honest[1]), reply(3, reference), reply(4, reference)]
    arrays, _ = s.aggregate_train(1, replies)
    assert [o.status for o in s.last_report.outcomes] == ["ok"] * 4
    assert [o.weight_used for o in s.last_report.outcomes][2:] == [0.0, 0.0]
    assert "changed nothing" in s.last_report.outcomes[2].reason
    expected = aggregate_lora_fedavg(honest, [10.0, 10.0])
    for k, v in arrayrecord_to_state(arrays).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-6)
    # Nor can one beside a rescaled (B/c, A·c) update turn the screen off for it: that update
    # is then one update alone, which the product-norm bound holds exactly.
    c = 1e3
    base = {k: reference[k] + 0.01 * v for k, v in adapter(20).items()}
    attacker = {k: (v * c if "lora_A" in k else v / c) for k, v in base.items()}
    s = strategy(mode="fedavg", max_update_norm=1.0)
    arrays, _ = s.aggregate_train(1, [reply(1, attacker), reply(2, reference)])
    got = arrayrecord_to_state(arrays)
    for k in got:
        np.testing.assert_allclose(got[k], attacker[k], rtol=1e-5, atol=1e-6)  # not A·c / 2
