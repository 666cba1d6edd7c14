"""``LoraFedAvg`` with ``robust`` and ``max_weight_ratio``: wiring, validation, capped weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from lora_messages import SHAPES, adapter, reply, strategy

from collm_fl.aggregation import aggregate_lora_exact
from collm_fl.aggregation_robust import aggregate_lora_robust
from collm_fl.flower_records import arrayrecord_to_state
from strategies.lora import LoraFedAvg


def assert_states_close(got, expected) -> None:
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"robust": "mean"}, "robust must be one of none, median, trimmed-mean"),
        ({"trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\)"),
        ({"trim_fraction": -0.1}, "trim_fraction"),
        ({"max_weight_ratio": 0.5}, "max_weight_ratio must be 0 \\(off\\) or >= 1"),
        ({"max_weight_ratio": -1.0}, "max_weight_ratio"),
        ({"max_weight_ratio": float("inf")}, "max_weight_ratio"),
        ({"max_weight_ratio": float("nan")}, "max_weight_ratio"),
    ],
)
def test_invalid_robust_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraFedAvg(**kwargs)


@pytest.mark.parametrize("robust", ["median", "trimmed-mean"])
def test_a_robust_strategy_aggregates_with_the_robust_statistic(robust):
    s = strategy(robust=robust, trim_fraction=0.2)
    states = [adapter(i) for i in range(1, 6)]
    weights = [10.0, 20.0, 30.0, 40.0, 50.0]
    replies = [reply(i + 1, st, w) for i, (st, w) in enumerate(zip(states, weights, strict=True))]
    arrays, _ = s.aggregate_train(1, replies)
    expected = aggregate_lora_robust(states, weights, adapter(0), robust, 0.2)
    assert_states_close(arrayrecord_to_state(arrays), expected)
    # Not what exact mode would give: the robust statistic replaced the combine step.
    exact = aggregate_lora_exact(states, weights)
    key = next(k for k in SHAPES if k.endswith("lora_B.weight"))
    assert not np.allclose(arrayrecord_to_state(arrays)[key], exact[key], atol=1e-4)
    # A median or trimmed mean gives no node a share of it: none is recorded.
    assert all(o.mean_share is None for o in s.last_report.outcomes)


def test_an_inflated_claim_is_capped_logged_and_recorded_in_its_outcome(caplog):
    s = strategy(max_weight_ratio=4.0)
    states = [adapter(i) for i in range(1, 5)]
    claimed = [10.0, 12.0, 8.0, 1e6]  # median 11 -> cap 44
    replies = [reply(i + 1, st, w) for i, (st, w) in enumerate(zip(states, claimed, strict=True))]
    with caplog.at_level(logging.WARNING, logger="strategies.lora"):
        arrays, metrics = s.aggregate_train(3, replies)
    assert_states_close(arrayrecord_to_state(arrays), aggregate_lora_exact(states, [10, 12, 8, 44]))
    losses = [1.1, 1.2, 1.3, 1.4]  # each reply's train-loss; the capped one weighs 44, not 1e6
    expected = sum(w * x for w, x in zip([10, 12, 8, 44], losses, strict=True)) / 74
    assert metrics["train-loss"] == pytest.approx(expected)
    by_node = {o.node_id: o for o in s.last_report.outcomes}
    assert by_node[4].status == "ok" and by_node[4].num_examples == 1_000_000
    assert by_node[4].weight_used == 44.0
    assert "num-examples 1e+06 capped to 44" in by_node[4].reason
    assert [by_node[n].weight_used for n in (1, 2, 3)] == [10.0, 12.0, 8.0]
    assert all(by_node[n].reason is None for n in (1, 2, 3))
    assert "round 3: node 4 claimed 1e+06 examples; weight capped to 44" in caplog.text


def test_without_a_cap_the_claimed_weights_are_used_as_they_are():
    s = strategy()
    states = [adapter(i) for i in range(1, 4)]
    claimed = [10.0, 12.0, 1e6]
    replies = [reply(i + 1, st, w) for i, (st, w) in enumerate(zip(states, claimed, strict=True))]
    arrays, _ = s.aggregate_train(1, replies)
    assert_states_close(arrayrecord_to_state(arrays), aggregate_lora_exact(states, claimed))
    assert [o.weight_used for o in s.last_report.outcomes] == claimed
