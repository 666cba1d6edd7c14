"""Robust aggregation and weight capping, checked against NumPy on tiny dense products."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, lora_pairs
from collm_fl.aggregation import dense_lora_sum
from collm_fl.aggregation_robust import aggregate_lora_robust, cap_weights
from collm_fl.errors import AdapterValidationError

# Two modules of different shapes; rank 2, so rank 5 (= min(6, 5)) is full rank for the first.
SHAPES = {"m.q": (6, 5), "m.v": (3, 5)}  # (d_out, d_in)
RANK = 2


def adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for m, (d_out, d_in) in SHAPES.items():
        state[m + LORA_A_SUFFIX] = rng.standard_normal((RANK, d_in)).astype(np.float32)
        state[m + LORA_B_SUFFIX] = (scale * rng.standard_normal((d_out, RANK))).astype(np.float32)
    return state


def products(states) -> dict[str, np.ndarray]:
    """Module -> float64 (K, d_out, d_in) stack of every state's B @ A."""
    pairs = [lora_pairs(s) for s in states]
    return {
        m: np.stack([p[m][1].astype(np.float64) @ p[m][0].astype(np.float64) for p in pairs])
        for m in SHAPES
    }


def dense(state) -> dict[str, np.ndarray]:
    return {
        m: b.astype(np.float64) @ a.astype(np.float64) for m, (a, b) in lora_pairs(state).items()
    }


def trimmed_mean(stack: np.ndarray, n_trim: int) -> np.ndarray:
    return np.sort(stack, axis=0)[n_trim : stack.shape[0] - n_trim].mean(axis=0)


def best_rank(m: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# ---- cap_weights ---------------------------------------------------------------------------------


def test_cap_weights_caps_each_claim_at_the_ratio_times_the_median():
    got = cap_weights([100, 120, 90, 1e6], max_ratio=4)
    np.testing.assert_array_equal(got, [100, 120, 90, 440])  # median 110 -> cap 440


@pytest.mark.parametrize("liar", [1e3, 1e6, 1e12])
def test_one_liar_among_three_cannot_move_the_cap(liar):
    np.testing.assert_array_equal(cap_weights([100, 80, liar], max_ratio=4), [100, 80, 400])


@pytest.mark.parametrize("ratio", [0.0, -1.0])
def test_cap_weights_off_returns_the_weights_unchanged(ratio):
    np.testing.assert_array_equal(cap_weights([1, 2, 1e9], ratio), [1, 2, 1e9])


@pytest.mark.parametrize(
    "weights,ratio,match",
    [
        ([1.0, 2.0, 3.0], 0.5, "max_ratio must be >= 1"),
        ([1.0, np.nan, 3.0], 4.0, "finite"),
        ([1.0, -2.0, 3.0], 4.0, ">= 0"),
        ([[1.0, 2.0]], 4.0, "flat"),
    ],
)
def test_cap_weights_rejects_invalid_arguments(weights, ratio, match):
    with pytest.raises(ValueError, match=match):
        cap_weights(weights, ratio)


# ---- aggregate_lora_robust: the statistics ------------------------------------------------------


@pytest.mark.parametrize("k", [4, 5])  # even K: the mean of the two middle values, as np.median
def test_median_at_full_rank_equals_numpys_coordinatewise_median_of_the_products(k):
    updates = [adapter(i + 1) for i in range(k)]
    weights = [1.0, 50.0, 2.0, 7.0, 3.0][:k]  # ignored: a weighted mean would differ
    got = aggregate_lora_robust(updates, weights, adapter(0), "median", rank=5)
    expected = {m: np.median(stack, axis=0) for m, stack in products(updates).items()}
    for m, value in dense(got).items():
        np.testing.assert_allclose(value, expected[m], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,trim,n_trim", [(5, 0.2, 1), (7, 0.2, 1), (6, 0.34, 2)])
def test_trimmed_mean_at_full_rank_equals_numpys_sorted_trimmed_mean(k, trim, n_trim):
    updates = [adapter(i + 1) for i in range(k)]
    weights = np.arange(1.0, k + 1.0)  # ignored
    got = aggregate_lora_robust(updates, weights, adapter(0), "trimmed-mean", trim, rank=5)
    expected = {m: trimmed_mean(stack, n_trim) for m, stack in products(updates).items()}
    for m, value in dense(got).items():
        np.testing.assert_allclose(value, expected[m], rtol=1e-4, atol=1e-4)
        assert not np.allclose(value, products(updates)[m].mean(axis=0), atol=1e-2)  # trimmed


def test_below_full_rank_the_result_is_the_best_rank_r_approximation_with_balanced_factors():
    updates = [adapter(i + 1) for i in range(5)]
    got = aggregate_lora_robust(updates, [1.0] * 5, adapter(0), "median")  # rank = RANK
    for m, (a, b) in lora_pairs(got).items():
        d_out, d_in = SHAPES[m]
        assert a.shape == (RANK, d_in) and b.shape == (d_out, RANK)
        target = best_rank(np.median(products(updates)[m], axis=0), RANK)
        np.testing.assert_allclose(b.astype(np.float64) @ a, target, rtol=1e-4, atol=1e-4)
        # √σ on each side: column i of B and row i of A have the same norm.
        np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1), rtol=1e-4)


def test_a_rank_above_the_matrix_rank_pads_the_factors_with_zeros():
    updates = [adapter(i + 1) for i in range(3)]
    got = aggregate_lora_robust(updates, [1.0] * 3, adapter(0), "median", rank=7)
    a, b = lora_pairs(got)["m.v"]  # (3, 5): matrix rank at most 3
    assert a.shape == (7, 5) and b.shape == (3, 7)
    assert not a[3:].any() and not b[:, 3:].any()
    expected = np.median(products(updates)["m.v"], axis=0)
    np.testing.assert_allclose(b.astype(np.float64) @ a, expected, rtol=1e-4, atol=1e-4)


def test_the_reference_changes_the_result_only_by_rounding():
    # Median and trimmed mean commute with adding a constant: robust(D_k) + ref = robust(P_k).
    updates = [adapter(i + 1) for i in range(5)]
    one = dense(aggregate_lora_robust(updates, [1.0] * 5, adapter(0), "median", rank=5))
    other = dense(aggregate_lora_robust(updates, [1.0] * 5, adapter(99, 5.0), "median", rank=5))
    for m in one:
        np.testing.assert_allclose(one[m], other[m], rtol=1e-4, atol=1e-4)


def test_one_scaled_outlier_among_five_moves_the_median_far_less_than_the_mean():
    updates = [adapter(i + 1) for i in range(4)]
    outlier = {k: v * (1e3 if k.endswith(LORA_B_SUFFIX) else 1) for k, v in adapter(9).items()}
    honest_median = dense(aggregate_lora_robust(updates, [1.0] * 4, adapter(0), "median", rank=5))
    got = dense(aggregate_lora_robust([*updates, outlier], [1.0] * 5, adapter(0), "median", rank=5))
    mean = dense_lora_sum([*updates, outlier], [1.0] * 5)
    for m in got:
        scale = np.linalg.norm(honest_median[m])
        assert np.linalg.norm(got[m] - honest_median[m]) < scale  # bounded by the honest spread
        assert np.linalg.norm(mean[m] - honest_median[m]) > 50 * scale  # the mean is not


# ---- fewer than three updates -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_below_three_updates_it_is_the_weighted_mean_and_warns(method, caplog):
    updates = [adapter(1), adapter(2)]
    with caplog.at_level(logging.WARNING, logger="collm_fl.aggregation_robust"):
        got = dense(aggregate_lora_robust(updates, [1.0, 3.0], adapter(0), method, rank=5))
    expected = dense_lora_sum(updates, [1.0, 3.0])
    for m in got:
        np.testing.assert_allclose(got[m], expected[m], rtol=1e-4, atol=1e-4)
    assert "needs >= 3 updates" in caplog.text


def test_a_single_update_comes_back_as_it_is():
    update = adapter(1)
    got = dense(aggregate_lora_robust([update], [5.0], adapter(0), "median"))  # rank 2: exact
    for m, value in dense(update).items():
        np.testing.assert_allclose(got[m], value, rtol=1e-4, atol=1e-5)


def test_a_trimmed_mean_that_trims_nothing_warns(caplog):
    updates = [adapter(i + 1) for i in range(4)]  # ⌊0.2·4⌋ = 0
    with caplog.at_level(logging.WARNING, logger="collm_fl.aggregation_robust"):
        aggregate_lora_robust(updates, [1.0] * 4, adapter(0), "trimmed-mean", 0.2)
    assert "trims nothing" in caplog.text


# ---- invalid arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "mean"}, "method must be one of"),
        ({"method": "trimmed-mean", "trim_fraction": 0.5}, "trim_fraction"),
        ({"method": "trimmed-mean", "trim_fraction": -0.1}, "trim_fraction"),
        ({"method": "median", "rank": 0}, "rank must be >= 1"),
        ({"method": "median", "weights": [1.0, 1.0]}, "got 2 weights for 3 updates"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    args = {"updates": [adapter(i) for i in range(3)], "weights": [1.0] * 3} | kwargs
    with pytest.raises(ValueError, match=match):
        aggregate_lora_robust(reference=adapter(0), **args)


def test_updates_that_do_not_match_the_reference_raise_a_validation_error():
    reference = adapter(0)
    reference["m.k" + LORA_A_SUFFIX] = np.zeros((RANK, 5), np.float32)
    reference["m.k" + LORA_B_SUFFIX] = np.zeros((4, RANK), np.float32)
    with pytest.raises(AdapterValidationError, match=r"lack reference module m\.k"):
        aggregate_lora_robust([adapter(1)] * 3, [1.0] * 3, reference, "median")


def test_updates_that_do_not_match_each_other_raise_a_validation_error():
    odd = adapter(3)
    odd["m.q" + LORA_A_SUFFIX] = np.zeros((RANK, 4), np.float32)
    with pytest.raises(AdapterValidationError, match="update 2"):
        aggregate_lora_robust([adapter(1), adapter(2), odd], [1.0] * 3, adapter(0), "median")
