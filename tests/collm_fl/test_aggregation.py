"""LoRA aggregation math against a NumPy reference on tiny shapes."""

from __future__ import annotations

import numpy as np
import pytest

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState, lora_pairs
from collm_fl.aggregation import (
    aggregate_lora_exact,
    aggregate_lora_fedavg,
    dense_lora_sum,
    lora_delta_norm,
    normalized_weights,
)
from collm_fl.errors import AdapterValidationError

MODULES = ("base_model.model.layers.0.q_proj", "base_model.model.layers.0.v_proj")


def make_updates(
    rng: np.random.Generator, k: int, d_out: int = 40, d_in: int = 32, r: int = 3
) -> list[AdapterState]:
    """K random client states with two modules of shape A (r, d_in), B (d_out, r)."""
    updates = []
    for _ in range(k):
        state: AdapterState = {}
        for m in MODULES:
            state[m + LORA_A_SUFFIX] = (
                rng.standard_normal((r, d_in)) / np.sqrt(d_in)  # (r, d_in)
            ).astype(np.float32)
            state[m + LORA_B_SUFFIX] = (rng.standard_normal((d_out, r)) * 0.01).astype(np.float32)
        updates.append(state)
    return updates


def truncated_svd(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]  # (d_out, d_in)


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return b.astype(np.float64) @ a.astype(np.float64)  # (d_out, d_in)


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_fedavg_equals_weighted_mean_of_factors(rng: np.random.Generator) -> None:
    updates = make_updates(rng, 4)
    weights = [1.0, 2.0, 3.0, 4.0]
    out = aggregate_lora_fedavg(updates, weights)
    p = np.array(weights) / sum(weights)
    for key in updates[0]:
        expected = sum(pk * u[key].astype(np.float64) for pk, u in zip(p, updates, strict=True))
        np.testing.assert_allclose(out[key], expected, rtol=1e-5, atol=1e-7)
        assert out[key].dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_exact_equals_truncated_svd_of_dense_sum(rng: np.random.Generator, dtype: str) -> None:
    updates = make_updates(rng, 5)
    weights = [3.0, 1.0, 4.0, 1.0, 5.0]
    out = aggregate_lora_exact(updates, weights, compute_dtype=dtype)  # type: ignore[arg-type]
    dense = dense_lora_sum(updates, weights)
    for m, (a, b) in lora_pairs(out).items():
        assert rel(product(a, b), truncated_svd(dense[m], 3)) < 1e-5


def test_exact_with_one_client_reproduces_its_product(rng: np.random.Generator) -> None:
    (update,) = make_updates(rng, 1)
    out = lora_pairs(aggregate_lora_exact([update], [7.0]))
    for m, (a, b) in lora_pairs(update).items():
        assert rel(product(*out[m]), product(a, b)) < 1e-5


def test_exact_of_identical_updates_equals_that_product(rng: np.random.Generator) -> None:
    (update,) = make_updates(rng, 1)
    out = lora_pairs(aggregate_lora_exact([update] * 4, [1.0, 2.0, 3.0, 4.0]))
    for m, (a, b) in lora_pairs(update).items():
        assert rel(product(*out[m]), product(a, b)) < 1e-5


def test_exact_handles_more_stacked_rank_than_dimensions(rng: np.random.Generator) -> None:
    # K·r = 5·4 = 20 > d_out = 12 and > d_in = 10: the thin QRs have fewer columns than K·r.
    updates = make_updates(rng, 5, d_out=12, d_in=10, r=4)
    weights = [1.0] * 5
    out = aggregate_lora_exact(updates, weights)
    dense = dense_lora_sum(updates, weights)
    for m, (a, b) in lora_pairs(out).items():
        assert a.shape == (4, 10) and b.shape == (12, 4)
        assert rel(product(a, b), truncated_svd(dense[m], 4)) < 1e-5


def test_exact_with_rank_above_dimensions_pads_with_zeros(rng: np.random.Generator) -> None:
    updates = make_updates(rng, 3, d_out=6, d_in=5, r=2)
    out = aggregate_lora_exact(updates, [1.0, 1.0, 1.0], rank=8)
    dense = dense_lora_sum(updates, [1.0, 1.0, 1.0])
    for m, (a, b) in lora_pairs(out).items():
        assert a.shape == (8, 5) and b.shape == (6, 8)
        assert rel(product(a, b), dense[m]) < 1e-5  # rank 8 >= 5: the sum is reproduced


def test_exact_scales_weights_to_sum_one(rng: np.random.Generator) -> None:
    updates = make_updates(rng, 3)
    small = aggregate_lora_exact(updates, [1.0, 2.0, 3.0])
    large = aggregate_lora_exact(updates, [100.0, 200.0, 300.0])
    for m, (a, b) in lora_pairs(small).items():
        a2, b2 = lora_pairs(large)[m]
        assert rel(product(a2, b2), product(a, b)) < 1e-5


def test_exact_preserves_keys_shapes_and_dtype(rng: np.random.Generator) -> None:
    updates = make_updates(rng, 3, d_out=24, d_in=48, r=2)
    out = aggregate_lora_exact(updates, [1.0, 1.0, 1.0])
    assert set(out) == set(updates[0])
    for key, value in out.items():
        assert value.shape == updates[0][key].shape
        assert value.dtype == np.float32


def test_exact_splits_singular_values_evenly_between_factors(rng: np.random.Generator) -> None:
    out = aggregate_lora_exact(make_updates(rng, 4), [1.0] * 4)
    for a, b in lora_pairs(out).values():
        # Balanced: row norms of A equal column norms of B (both sqrt of the singular values).
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=0), rtol=1e-4)


def test_exact_of_zero_b_gives_zeros_without_nan(rng: np.random.Generator) -> None:
    # Round 1 of LoRA: B is initialised to zero, so every product (and the sum) is zero.
    updates = make_updates(rng, 3)
    for u in updates:
        for m in MODULES:
            u[m + LORA_B_SUFFIX] = np.zeros_like(u[m + LORA_B_SUFFIX])
    out = aggregate_lora_exact(updates, [1.0, 2.0, 3.0])
    for key, value in out.items():
        assert value.shape == updates[0][key].shape
        assert np.all(np.isfinite(value))
    for a, b in lora_pairs(out).values():
        assert np.all(product(a, b) == 0)


def test_exact_matches_fedavg_error_bound(rng: np.random.Generator) -> None:
    # Exact is optimal, so it can never be further from the dense sum than FedAvg.
    updates = make_updates(rng, 5)
    weights = [1.0, 2.0, 1.0, 2.0, 1.0]
    dense = dense_lora_sum(updates, weights)
    exact = lora_pairs(aggregate_lora_exact(updates, weights))
    avg = lora_pairs(aggregate_lora_fedavg(updates, weights))
    for m in MODULES:
        assert rel(product(*exact[m]), dense[m]) <= rel(product(*avg[m]), dense[m]) + 1e-6


@pytest.mark.parametrize(
    ("weights", "n"),
    [([], 0), ([1.0, 2.0], 3), ([0.0, 0.0], 2), ([1.0, -1.0], 2), ([float("nan"), 1.0], 2)],
)
def test_bad_weights_raise_value_error(weights: list[float], n: int) -> None:
    with pytest.raises(ValueError):
        normalized_weights(weights, n)


def test_mismatched_update_shapes_raise_validation_error(rng: np.random.Generator) -> None:
    updates = make_updates(rng, 2) + make_updates(rng, 1, r=4)
    with pytest.raises(AdapterValidationError, match="update 2"):
        aggregate_lora_exact(updates, [1.0, 1.0, 1.0])


def test_lora_delta_norm_equals_dense_norm(rng: np.random.Generator) -> None:
    new, old = make_updates(rng, 2, d_out=30, d_in=24, r=3)
    for m in MODULES:
        a_n, b_n = lora_pairs(new)[m]
        a_o, b_o = lora_pairs(old)[m]
        expected = np.linalg.norm(product(a_n, b_n) - product(a_o, b_o))
        assert lora_delta_norm(a_n, b_n, a_o, b_o) == pytest.approx(expected, rel=1e-10)


def test_lora_delta_norm_is_accurate_for_tiny_changes(rng: np.random.Generator) -> None:
    (old,) = make_updates(rng, 1)
    a_o, b_o = lora_pairs(old)[MODULES[0]]
    a_n = a_o.astype(np.float64) + 1e-9 * rng.standard_normal(a_o.shape)
    expected = np.linalg.norm(product(a_n, b_o) - product(a_o, b_o))
    assert lora_delta_norm(a_n, b_o, a_o, b_o) == pytest.approx(expected, rel=1e-5)


# ---- server learning rate (global + η·(aggregate − global)) ----


def test_fedavg_server_lr_steps_from_the_reference(rng: np.random.Generator) -> None:
    ref, *updates = make_updates(rng, 3)
    out = aggregate_lora_fedavg(updates, [1.0, 3.0], server_lr=2.5, reference=ref)
    mean = aggregate_lora_fedavg(updates, [1.0, 3.0])
    for key in ref:
        expected = ref[key] + 2.5 * (mean[key].astype(np.float64) - ref[key])
        np.testing.assert_allclose(out[key], expected, rtol=1e-5, atol=1e-6)


def test_exact_server_lr_is_the_truncated_svd_of_the_server_step(rng: np.random.Generator) -> None:
    ref, *updates = make_updates(rng, 4)
    weights = [2.0, 1.0, 1.0]
    out = aggregate_lora_exact(updates, weights, server_lr=3.0, reference=ref)
    mean = dense_lora_sum(updates, weights)  # Σ p_k B_k A_k, p normalised
    for m, (a, b) in lora_pairs(out).items():
        ref_a, ref_b = lora_pairs(ref)[m]
        step = product(ref_a, ref_b) + 3.0 * (mean[m] - product(ref_a, ref_b))
        assert rel(product(a, b), truncated_svd(step, 3)) < 1e-4


def test_exact_server_lr_on_a_shared_subspace_is_exact(rng: np.random.Generator) -> None:
    # Every update keeps the reference's A: the step stays rank r, so nothing is truncated away.
    ref, *others = make_updates(rng, 3)
    updates = [{k: (ref[k] if k.endswith(LORA_A_SUFFIX) else u[k]) for k in ref} for u in others]
    out = lora_pairs(aggregate_lora_exact(updates, [1.0, 1.0], server_lr=2.0, reference=ref))
    for m, (ref_a, ref_b) in lora_pairs(ref).items():
        mean_b = (lora_pairs(updates[0])[m][1] + lora_pairs(updates[1])[m][1]) / 2.0
        expected = product(ref_a, ref_b + 2.0 * (mean_b - ref_b))
        assert rel(product(*out[m]), expected) < 1e-5


@pytest.mark.parametrize("fn", [aggregate_lora_exact, aggregate_lora_fedavg])
def test_server_lr_one_is_plain_aggregation(rng: np.random.Generator, fn) -> None:  # type: ignore[no-untyped-def]
    ref, *updates = make_updates(rng, 3)
    plain, stepped = fn(updates, [1.0, 2.0]), fn(updates, [1.0, 2.0], server_lr=1.0, reference=ref)
    for key in plain:
        np.testing.assert_array_equal(plain[key], stepped[key])


@pytest.mark.parametrize("fn", [aggregate_lora_exact, aggregate_lora_fedavg])
def test_bad_server_lr_or_missing_reference_raise(rng: np.random.Generator, fn) -> None:  # type: ignore[no-untyped-def]
    ref, *updates = make_updates(rng, 3)
    for eta in (0.0, -1.0, float("nan"), 17.0):
        with pytest.raises(ValueError, match="server_lr must be in"):
            fn(updates, [1.0, 1.0], server_lr=eta, reference=ref)
    with pytest.raises(ValueError, match="needs the reference"):
        fn(updates, [1.0, 1.0], server_lr=2.0)
