"""Validation and clipping of client updates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState
from collm_fl.errors import AdapterValidationError
from collm_fl.validation import UpdateCheck, clip_factor_update, validate_update

Q = "base_model.model.layers.0.q_proj"
V = "base_model.model.layers.0.v_proj"


def make_state(rng: np.random.Generator, r: int = 2, d: int = 24) -> AdapterState:
    state: AdapterState = {}
    for m in (Q, V):
        state[m + LORA_A_SUFFIX] = rng.standard_normal((r, d)).astype(np.float32)  # (r, d_in)
        state[m + LORA_B_SUFFIX] = rng.standard_normal((d, r)).astype(np.float32)  # (d_out, r)
    return state


def dense_change(update: AdapterState, reference: AdapterState) -> float:
    total = 0.0
    for m in (Q, V):
        w_new = update[m + LORA_B_SUFFIX].astype(np.float64) @ update[m + LORA_A_SUFFIX]
        w_old = reference[m + LORA_B_SUFFIX].astype(np.float64) @ reference[m + LORA_A_SUFFIX]
        total += float(np.sum((w_new - w_old) ** 2))
    return math.sqrt(total)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_valid_update_passes_with_dense_update_norm(rng: np.random.Generator) -> None:
    reference, update = make_state(rng), make_state(rng)
    check = validate_update(update, reference, max_update_norm=None)
    assert check == UpdateCheck(ok=True, reasons=(), update_norm=check.update_norm)
    assert check.update_norm == pytest.approx(dense_change(update, reference), rel=1e-6)
    check.raise_if_invalid()


def test_validate_collects_missing_key_nan_and_wrong_shape_at_once(
    rng: np.random.Generator,
) -> None:
    reference, update = make_state(rng), make_state(rng)
    del update[Q + LORA_A_SUFFIX]
    update[Q + LORA_B_SUFFIX][0, 0] = np.nan
    update[Q + LORA_B_SUFFIX][1, 1] = np.inf
    update[V + LORA_A_SUFFIX] = np.zeros((3, 24), dtype=np.float32)  # rank 3 instead of 2
    check = validate_update(update, reference, max_update_norm=1.0)
    assert not check.ok
    text = "\n".join(check.reasons)
    assert f"missing key '{Q + LORA_A_SUFFIX}'" in text
    assert f"{Q + LORA_B_SUFFIX}: 2 non-finite values" in text
    assert f"{V + LORA_A_SUFFIX}: shape (3, 24) != expected (2, 24)" in text
    assert len(check.reasons) == 3  # no module could be normed, so no norm complaint
    with pytest.raises(AdapterValidationError) as err:
        check.raise_if_invalid()
    assert len(err.value.problems) == 3


def test_validate_reports_unexpected_key_and_integer_dtype(rng: np.random.Generator) -> None:
    reference, update = make_state(rng), make_state(rng)
    update["base_model.model.lm_head.weight"] = np.zeros((4, 4), dtype=np.float32)
    update[V + LORA_B_SUFFIX] = update[V + LORA_B_SUFFIX].astype(np.int32)
    check = validate_update(update, reference, max_update_norm=None)
    assert not check.ok
    assert any("unexpected key 'base_model.model.lm_head.weight'" in r for r in check.reasons)
    assert any("int32 is not a floating-point type" in r for r in check.reasons)


def test_update_norm_above_bound_is_rejected(rng: np.random.Generator) -> None:
    reference, update = make_state(rng), make_state(rng)
    norm = dense_change(update, reference)
    assert validate_update(update, reference, max_update_norm=norm * 1.01).ok
    check = validate_update(update, reference, max_update_norm=norm * 0.5)
    assert not check.ok
    assert len(check.reasons) == 1 and "exceeds max_update_norm" in check.reasons[0]


def test_update_norm_ignores_rescaling_of_factors(rng: np.random.Generator) -> None:
    # (B·c, A/c) is the same adapter: the norm of the product change must not see c.
    reference = make_state(rng)
    update = {k: v * (10.0 if k.endswith(LORA_B_SUFFIX) else 0.1) for k, v in reference.items()}
    assert validate_update(update, reference, None).update_norm < 1e-4


def test_non_positive_bound_is_refused(rng: np.random.Generator) -> None:
    state = make_state(rng)
    with pytest.raises(ValueError):
        validate_update(state, state, max_update_norm=0.0)


def test_clip_factor_update_bounds_the_factor_delta(rng: np.random.Generator) -> None:
    reference, update = make_state(rng), make_state(rng)
    clipped, before = clip_factor_update(update, reference, max_norm=1.0)
    expected_before = math.sqrt(
        sum(float(np.sum((update[k] - reference[k]).astype(np.float64) ** 2)) for k in reference)
    )
    assert before == pytest.approx(expected_before, rel=1e-6)
    after = math.sqrt(
        sum(float(np.sum((clipped[k] - reference[k]).astype(np.float64) ** 2)) for k in reference)
    )
    assert after == pytest.approx(1.0, rel=1e-5)
    for k in reference:  # the direction of the change is kept
        np.testing.assert_allclose(
            clipped[k] - reference[k], (update[k] - reference[k]) / before, rtol=1e-4, atol=1e-6
        )


def test_clip_factor_update_leaves_small_updates_unchanged(rng: np.random.Generator) -> None:
    reference, update = make_state(rng), make_state(rng)
    clipped, before = clip_factor_update(update, reference, max_norm=1e6)
    assert before < 1e6
    for k in reference:
        np.testing.assert_array_equal(clipped[k], update[k])


def test_clip_factor_update_rejects_structural_mismatch(rng: np.random.Generator) -> None:
    reference, update = make_state(rng), make_state(rng)
    del update[Q + LORA_A_SUFFIX]
    with pytest.raises(AdapterValidationError, match="missing key"):
        clip_factor_update(update, reference, max_norm=1.0)


def test_an_update_too_large_to_aggregate_is_rejected_even_without_a_bound():
    ref = {
        "m.lora_A.weight": np.zeros((2, 4), np.float32),
        "m.lora_B.weight": np.zeros((4, 2), np.float32),
    }
    huge = {k: np.full_like(v, 1e25) for k, v in ref.items()}
    check = validate_update(huge, ref, max_update_norm=None)
    assert not check.ok and "a value of magnitude 1e+25" in check.reasons[0]
    # Every value under the factor bound, but a wide module's product past what float32 sums hold.
    ref = {
        "m.lora_A.weight": np.zeros((2, 2000), np.float32),
        "m.lora_B.weight": np.zeros((2000, 2), np.float32),
    }
    wide = {k: np.full_like(v, 9e5) for k, v in ref.items()}
    check = validate_update(wide, ref, max_update_norm=None)
    assert not check.ok and "too large to aggregate" in check.reasons[0]
