"""Poisoned client updates against ``LoraFedAvg``: rejected with a stored reason, or bounded.

Honest clients here move the tiny model's LoRA the way a real round does (‖ΔBA‖_F ≈ 0.02 per
client, the size measured between v0 and v1 of a tiny-model run; SmolLM2-135M rounds measure
0.26–0.50). One client among them sends a poisoned reply. Structural and non-finite poison is
rejected; a norm bound rejects updates scaled past it; a sign-flipped update keeps its norm, so
no norm check can see it: the tests measure how far it moves the aggregate instead. The last
section measures the defences: a coordinate-wise median or trimmed mean (``robust``) and a cap on
the claimed ``num-examples`` (``max_weight_ratio``).
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, lora_pairs
from collm_fl.aggregation import dense_lora_sum
from collm_fl.flower_records import arrayrecord_to_state, state_to_arrayrecord
from collm_fl.store import RoundRecord, VersionStore
from server_app.federation import participation_record
from strategies.lora import LoraFedAvg

# The tiny model's LoRA at r=8 (2 layers, q_proj 128->128, v_proj 128->64).
MODULES = {
    f"base_model.model.model.layers.{i}.self_attn.{m}": (128, d_out)
    for i in range(2)
    for m, d_out in (("q_proj", 128), ("v_proj", 64))
}
RANK = 8
HONEST_NORM = 0.02  # per-client ‖ΔBA‖_F
N_HONEST = 4


@pytest.fixture(autouse=True)
def flower_task_identity(monkeypatch):
    """Messages read the run/node identity Flower sets in an app process; set one for tests."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def reference_state() -> dict[str, np.ndarray]:
    """The global adapter a round starts from: PEFT's init (A random, B = 0), i.e. version 0."""
    rng = np.random.default_rng(0)
    state = {}
    for m, (d_in, d_out) in MODULES.items():
        state[m + LORA_A_SUFFIX] = (rng.standard_normal((RANK, d_in)) / np.sqrt(d_in)).astype(
            np.float32
        )
        state[m + LORA_B_SUFFIX] = np.zeros((d_out, RANK), np.float32)
    return state


def honest_updates(reference, n: int = N_HONEST) -> list[dict[str, np.ndarray]]:
    """Clients that agree on a direction (B*) with 20% individual noise, each ‖ΔBA‖ ≈ 0.02."""
    rng = np.random.default_rng(1)
    direction = {m: rng.standard_normal((d_out, RANK)) for m, (_, d_out) in MODULES.items()}
    clients = []
    for _ in range(n):
        state = {}
        for m in MODULES:
            b = direction[m] + 0.2 * rng.standard_normal(direction[m].shape)
            state[m + LORA_A_SUFFIX] = reference[m + LORA_A_SUFFIX].copy()
            state[m + LORA_B_SUFFIX] = b.astype(np.float32)
        scale = HONEST_NORM / product_delta_norm(state, reference)
        for m in MODULES:
            state[m + LORA_B_SUFFIX] *= np.float32(scale)
        clients.append(state)
    return clients


def product_delta(state, reference) -> dict[str, np.ndarray]:
    ref = lora_pairs(reference)
    return {
        m: b.astype(np.float64) @ a - ref[m][1].astype(np.float64) @ ref[m][0]
        for m, (a, b) in lora_pairs(state).items()
    }


def product_delta_norm(state, reference) -> float:
    return float(np.sqrt(sum(np.sum(d * d) for d in product_delta(state, reference).values())))


def flat(deltas: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([deltas[m].ravel() for m in sorted(deltas)])


def reply(node: int, state, num_examples: float = 100.0) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train"
    )
    metrics = {"num-examples": num_examples, "train-loss": 1.0}
    # Arrays as the client sent them: no cast to float32 on the way (a client may send anything).
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(state[k])) for k in sorted(state)})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=instruction)


def run_round(states, reference, weights=None, **strategy_kw):
    """One aggregate_train over the given replies; (aggregate state or None, report)."""
    s = LoraFedAvg(min_train_nodes=1, min_available_nodes=1, **strategy_kw)
    s.current_arrays = state_to_arrayrecord(reference)
    weights = weights or [100.0] * len(states)
    replies = [reply(i + 1, st, w) for i, (st, w) in enumerate(zip(states, weights, strict=True))]
    arrays, _ = s.aggregate_train(1, replies)
    return (arrayrecord_to_state(arrays) if arrays is not None else None), s.last_report


def store_round(tmp_path, report):
    """Store the round as the ServerApp does; read the participations back."""
    with VersionStore(tmp_path / "store") as store:
        run = store.open_run("poison", {}, base_model="tiny")
        now = datetime.now(UTC)
        store.record_round_result(
            run.id,
            RoundRecord(
                number=1,
                status="aggregated",
                started_at=now,
                finished_at=now,
                num_ok=report.count("ok"),
                num_rejected=report.count("rejected"),
                num_failed=report.count("failed"),
                seconds=0.0,
            ),
            [participation_record(o) for o in report.outcomes],
        )
        return {p.node_id: p for p in store.participations(run.id)}


def deviation(aggregate, reference, honest_only) -> tuple[float, float]:
    """(‖Δagg − Δhonest‖ / ‖Δhonest‖, cosine(Δagg, Δhonest)) in product (ΔBA) space."""
    agg = flat(product_delta(aggregate, reference))
    hon = flat(product_delta(honest_only, reference))
    rel = float(np.linalg.norm(agg - hon) / np.linalg.norm(hon))
    cos = float(agg @ hon / (np.linalg.norm(agg) * np.linalg.norm(hon)))
    return rel, cos


# ---- rejected, with the reason stored -----------------------------------------------------------


def poison(reference, honest, kind: str) -> dict[str, np.ndarray]:
    state = {k: v.copy() for k, v in honest.items()}
    first_b = next(k for k in state if k.endswith(LORA_B_SUFFIX))
    first_a = next(k for k in state if k.endswith(LORA_A_SUFFIX))
    if kind == "nan":
        state[first_b][0, 0] = np.nan
    elif kind == "+inf":
        state[first_b][:] = np.inf
    elif kind == "-inf":
        state[first_a][3, 3] = -np.inf
    elif kind == "transposed":
        state[first_a] = np.ascontiguousarray(state[first_a].T)
    elif kind == "wrong-rank":
        state[first_a], state[first_b] = state[first_a][:4], state[first_b][:, :4]
    elif kind == "missing-key":
        del state[first_b]
    elif kind == "extra-key":
        state["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
    elif kind == "int-dtype":
        state[first_a] = np.ones(state[first_a].shape, np.int32)
    elif kind == "huge":  # 10^4 x an honest update: norm ~200, over the default bound of 50
        state = {k: v * (1e4 if k.endswith(LORA_B_SUFFIX) else 1) for k, v in state.items()}
    return state


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("nan", "non-finite"),
        ("+inf", "non-finite"),
        ("-inf", "non-finite"),
        ("transposed", "shape"),
        ("wrong-rank", "shape"),
        ("missing-key", "missing key"),
        ("extra-key", "unexpected key"),
        ("int-dtype", "dtype"),
        ("huge", "exceeds max_update_norm"),
    ],
)
def test_a_poisoned_reply_is_rejected_with_its_reason_stored_and_the_round_goes_on(
    tmp_path, kind, reason
):
    reference = reference_state()
    honest = honest_updates(reference)
    bad = poison(reference, honest[0], kind)
    aggregate, report = run_round([*honest, bad], reference, max_update_norm=50.0)
    assert report.count("ok") == N_HONEST and report.count("rejected") == 1
    honest_only, _ = run_round(honest, reference, max_update_norm=50.0)
    for k, v in honest_only.items():  # the poisoned reply contributed nothing
        np.testing.assert_allclose(aggregate[k], v, rtol=1e-6, atol=1e-9)
    stored = store_round(tmp_path, report)
    assert stored[N_HONEST + 1].status == "rejected"
    assert reason in stored[N_HONEST + 1].reason, stored[N_HONEST + 1].reason


def test_a_round_of_only_poisoned_replies_keeps_the_previous_version():
    reference = reference_state()
    honest = honest_updates(reference)
    kinds = ("nan", "+inf", "transposed", "huge")
    bad = [poison(reference, h, k) for h, k in zip(honest, kinds, strict=True)]
    aggregate, report = run_round(bad, reference, max_update_norm=50.0)
    assert aggregate is None and not report.aggregated
    assert report.count("rejected") == 4


# ---- bounded by the norm check (or not) ---------------------------------------------------------


def scaled(reference, state, factor: float) -> dict[str, np.ndarray]:
    """The same direction, ``factor`` times the product change (B0 = 0: scale B)."""
    return {k: v * np.float32(factor) if k.endswith(LORA_B_SUFFIX) else v for k, v in state.items()}


def test_a_10x_scaled_update_passes_the_default_bound_and_is_caught_by_a_tight_one():
    reference = reference_state()
    honest = honest_updates(reference)
    attack = scaled(reference, honest[0], 10.0)
    assert product_delta_norm(attack, reference) == pytest.approx(10 * HONEST_NORM, rel=1e-4)

    # Default max-update-norm (50) is 2500x an honest tiny-model update: the attack passes.
    aggregate, report = run_round([*honest, attack], reference, max_update_norm=50.0)
    assert report.count("ok") == N_HONEST + 1
    honest_only, _ = run_round(honest, reference)
    rel, cos = deviation(aggregate, reference, honest_only)
    print(f"\n10x scaled, default bound: accepted; moves the aggregate {rel:.3f}, cos {cos:.4f}")
    # Equal weights: Δagg ≈ (N·h + 10h)/(N+1) = 2.8h for N = 4: 1.8x the honest step added.
    assert 1.2 < rel < 2.2 and cos > 0.9, (rel, cos)

    # A bound of 3x the honest norm rejects it and leaves the honest aggregate.
    aggregate, report = run_round([*honest, attack], reference, max_update_norm=3 * HONEST_NORM)
    assert report.count("rejected") == 1
    rel, _ = deviation(aggregate, reference, honest_only)
    assert rel < 1e-5


@pytest.mark.parametrize("mode", ["exact", "fedavg"])
def test_a_sign_flipped_update_passes_every_norm_check_and_pulls_the_aggregate_back_by_2_over_n(
    mode,
):
    reference = reference_state()
    honest = honest_updates(reference)
    flipped = {k: -v if k.endswith(LORA_B_SUFFIX) else v for k, v in honest[0].items()}
    assert product_delta_norm(flipped, reference) == pytest.approx(HONEST_NORM, rel=1e-5)

    # Even a bound as tight as the honest norm itself lets it through: same norm, opposite sign.
    aggregate, report = run_round(
        [*honest, flipped], reference, mode=mode, max_update_norm=1.01 * HONEST_NORM
    )
    assert report.count("ok") == N_HONEST + 1, [o.reason for o in report.outcomes]
    honest_only, _ = run_round(honest, reference, mode=mode)
    rel, cos = deviation(aggregate, reference, honest_only)
    n = N_HONEST + 1
    print(f"\nsign flip ({mode}), 1 of {n}: moves the aggregate {rel:.3f}, cos {cos:.4f}")
    # One of n equal-weight clients flipping the sign removes 2/n of the honest step.
    assert rel == pytest.approx(2 / n, abs=0.05), rel
    assert cos > 0.99, cos  # the direction survives; only the step shrinks


def test_a_sign_flipped_update_with_an_inflated_num_examples_reverses_the_aggregate():
    reference = reference_state()
    honest = honest_updates(reference)
    flipped = {k: -v if k.endswith(LORA_B_SUFFIX) else v for k, v in honest[0].items()}
    # num-examples is the client's own claim and is used as its aggregation weight as is.
    aggregate, report = run_round(
        [*honest, flipped],
        reference,
        weights=[100.0] * N_HONEST + [1e6],
        max_update_norm=1.01 * HONEST_NORM,
    )
    assert report.count("ok") == N_HONEST + 1
    honest_only, _ = run_round(honest, reference)
    rel, cos = deviation(aggregate, reference, honest_only)
    print(f"\nsign flip claiming 1e6 examples: moves the aggregate {rel:.3f}, cos {cos:.4f}")
    assert cos < -0.9 and rel > 1.8, (rel, cos)  # the global step now points the other way


# ---- defended: robust aggregation and a weight cap -----------------------------------------------


def deviation_from_honest_mean(aggregate, reference, honest) -> tuple[float, float]:
    """As :func:`deviation`, against the dense mean of the honest products (``dense_lora_sum``)."""
    ref = lora_pairs(reference)
    mean = dense_lora_sum(honest, [1.0] * len(honest))
    hon = flat({m: d - ref[m][1].astype(np.float64) @ ref[m][0] for m, d in mean.items()})
    agg = flat(product_delta(aggregate, reference))
    rel = float(np.linalg.norm(agg - hon) / np.linalg.norm(hon))
    cos = float(agg @ hon / (np.linalg.norm(agg) * np.linalg.norm(hon)))
    return rel, cos


def attack(reference, honest, kind: str) -> dict[str, np.ndarray]:
    if kind == "sign-flip":
        return {k: -v if k.endswith(LORA_B_SUFFIX) else v for k, v in honest.items()}
    return scaled(reference, honest, 10.0)


@pytest.mark.parametrize("robust", ["median", "trimmed-mean"])
def test_a_robust_aggregate_of_honest_replies_stays_close_to_their_mean(robust):
    reference = reference_state()
    honest = honest_updates(reference)
    aggregate, _ = run_round(honest, reference, robust=robust)
    rel, cos = deviation_from_honest_mean(aggregate, reference, honest)
    print(f"\n{robust}, {N_HONEST} honest only: {rel:.3f} from their mean, cos {cos:.4f}")
    # The price of robustness: the median of 4 is not their mean; trimming 0.2 of 4 trims nothing.
    assert rel < 0.05 and cos > 0.998, (rel, cos)


@pytest.mark.parametrize("robust", ["median", "trimmed-mean"])
@pytest.mark.parametrize("kind", ["sign-flip", "10x-scaled"])
def test_a_robust_aggregate_outvotes_a_sign_flipped_or_scaled_update(robust, kind):
    reference = reference_state()
    honest = honest_updates(reference)
    bad = attack(reference, honest[0], kind)
    aggregate, report = run_round([*honest, bad], reference, robust=robust, max_update_norm=50.0)
    assert report.count("ok") == N_HONEST + 1  # accepted, as without the defence
    rel, cos = deviation_from_honest_mean(aggregate, reference, honest)
    print(f"\n{kind}, {robust}, 1 of {N_HONEST + 1}: moves the aggregate {rel:.3f}, cos {cos:.4f}")
    # Undefended: 0.40 (sign flip) and 1.83 (10x), see the tests above.
    assert rel < 0.1 and cos > 0.995, (rel, cos)


@pytest.mark.parametrize(
    "ratio,robust,rel_range,cos_range",
    [
        # The flip weighs 4 x 100 = all honest weight together: it cancels the step (2·400/800 = 1).
        (4.0, "none", (0.9, 1.1), (-0.1, 0.1)),
        # Weight 200 of 600: removes 2·200/600 = 0.67 of the honest step.
        (2.0, "none", (0.6, 0.74), (0.95, 1.0)),
        # The median does not use weights at all.
        (4.0, "median", (0.0, 0.1), (0.995, 1.0)),
    ],
)
def test_a_weight_cap_stops_an_inflated_num_examples_from_reversing_the_aggregate(
    tmp_path, ratio, robust, rel_range, cos_range
):
    reference = reference_state()
    honest = honest_updates(reference)
    flipped = attack(reference, honest[0], "sign-flip")
    aggregate, report = run_round(
        [*honest, flipped],
        reference,
        weights=[100.0] * N_HONEST + [1e6],
        max_update_norm=1.01 * HONEST_NORM,
        max_weight_ratio=ratio,
        robust=robust,
    )
    rel, cos = deviation_from_honest_mean(aggregate, reference, honest)
    print(f"\nsign flip claiming 1e6, cap {ratio:g}, robust {robust}: {rel:.3f}, cos {cos:.4f}")
    assert rel_range[0] < rel < rel_range[1] and cos_range[0] < cos < cos_range[1], (rel, cos)
    # The capped weight is stored with the participation, beside the claim.
    attacker = N_HONEST + 1
    stored = store_round(tmp_path, report)
    assert stored[attacker].status == "ok" and stored[attacker].num_examples == 1_000_000
    assert stored[attacker].metrics["weight-used"] == ratio * 100
    assert f"capped to {ratio * 100:g}" in stored[attacker].reason
    assert all(stored[n].metrics["weight-used"] == 100.0 for n in range(1, attacker))
