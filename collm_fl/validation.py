"""Checks on a client's adapter update before the server lets it into an aggregate.

A bad update (wrong rank, a NaN from a diverged step, a poisoned or exploded change) would spoil
the global adapter for every client and every replica serving it, so the server checks each one
against the current global state (the *reference*) first. Following the vLLM habit, a check
collects every problem it finds instead of stopping at the first, so one log line tells the
operator everything that was wrong with a client.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from collm_fl.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState, lora_pairs
from collm_fl.aggregation import lora_delta_norm
from collm_fl.errors import AdapterValidationError

log = logging.getLogger(__name__)

# Past this ‖ΔBA‖ the float32 products and Gram matrices of the aggregation overflow (whatever
# ``max_update_norm`` says, 0 = no bound included): no honest LoRA update comes near it.
MAX_AGGREGABLE_NORM = 1e15
# Past this |value| a factor is no LoRA factor (they start near 1/sqrt(d_in) and 0): the norm of
# the product change cannot see it when the other factor is 0 (B = 0 at v0), and the aggregation's
# float32 arithmetic (a value past 3.4e38 is inf there; a server step scales it) would overflow.
MAX_FACTOR_ABS = 1e6


@dataclass(frozen=True)
class UpdateCheck:
    """The verdict on one client update."""

    ok: bool  # True when reasons is empty
    reasons: tuple[str, ...]  # every problem found, in a stable order
    update_norm: float  # ‖ΔW‖_F over the modules that could be checked (scale excluded)

    def raise_if_invalid(self) -> None:
        """Raise :class:`AdapterValidationError` carrying every reason, if there are any."""
        if not self.ok:
            raise AdapterValidationError(list(self.reasons))


def _array_problems(key: str, value: object, expected: np.ndarray) -> list[str]:
    """What is wrong with one tensor of an update, compared with the reference tensor."""
    if not isinstance(value, np.ndarray):
        return [f"{key}: expected a numpy array, got {type(value).__name__}"]
    problems = []
    if value.shape != expected.shape:  # (its values are not scanned: it is refused anyway)
        problems.append(f"{key}: shape {value.shape} != expected {expected.shape}")
    if not np.issubdtype(value.dtype, np.floating):
        problems.append(f"{key}: dtype {value.dtype} is not a floating-point type")
    else:
        if problems:
            return problems
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            problems.append(f"{key}: {bad} non-finite values (NaN/inf)")
        elif value.size and (largest := float(np.max(np.abs(value)))) > MAX_FACTOR_ABS:
            problems.append(
                f"{key}: a value of magnitude {largest:.3g} (over {MAX_FACTOR_ABS:.0e}: no LoRA "
                "factor comes near it)"
            )
    return problems


def key_problems(keys: Iterable[str], reference: Mapping[str, np.ndarray]) -> list[str]:
    """An update's missing and unexpected keys against the reference's, in a stable order."""
    got = set(keys)
    problems = [f"missing key {k!r}" for k in sorted(set(reference) - got)]
    return problems + [f"unexpected key {k!r}" for k in sorted(got - set(reference))]


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_update_norm: float | None,
) -> UpdateCheck:
    """Check a client update against the reference (global) state; collect every problem.

    Checks: missing keys, unexpected keys, shape per key (this also enforces the shared LoRA rank),
    floating dtype, non-finite values (with their count), values past ``MAX_FACTOR_ABS``, and the
    update norm against ``max_update_norm`` (``None`` = no bound).

    The update norm is ``sqrt(Σ_modules ‖B A − B_ref A_ref‖_F²)``: the size of the change to the
    effective weights the model actually uses. The raw factors are not a good measure, because
    ``(B·c, A/c)`` is the same adapter for any ``c`` and a client can move a lot in factor space
    while changing the model very little, or the reverse. Modules with a structural problem or
    non-finite values are left out of the norm (the update is rejected anyway).
    """
    if max_update_norm is not None and not max_update_norm > 0:
        raise ValueError(f"max_update_norm must be > 0 or None, got {max_update_norm}")
    ref_pairs = lora_pairs(reference)
    reasons = key_problems(update, reference)
    sq_norm = 0.0
    for m, (a_ref, b_ref) in sorted(ref_pairs.items()):
        key_a, key_b = m + LORA_A_SUFFIX, m + LORA_B_SUFFIX
        module_ok = key_a in update and key_b in update
        for key, ref in ((key_a, a_ref), (key_b, b_ref)):
            if key in update:
                problems = _array_problems(key, update[key], ref)
                reasons += problems
                module_ok = module_ok and not problems
        if module_ok:
            sq_norm += lora_delta_norm(update[key_a], update[key_b], a_ref, b_ref) ** 2
    norm = math.sqrt(sq_norm)
    if not norm <= MAX_AGGREGABLE_NORM:  # also NaN / inf
        reasons.append(
            f"update norm {norm:.6g} is too large to aggregate (limit {MAX_AGGREGABLE_NORM:.0e})"
        )
    elif max_update_norm is not None and norm > max_update_norm:
        reasons.append(f"update norm {norm:.6g} exceeds max_update_norm {max_update_norm:.6g}")
    if reasons:
        log.debug("update rejected: %s", "; ".join(reasons))
    return UpdateCheck(ok=not reasons, reasons=tuple(reasons), update_norm=norm)


def clip_factor_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_norm: float
) -> tuple[AdapterState, float]:
    """Scale the factor change so its L2 norm is at most ``max_norm``; return it and the old norm.

    Returns ``reference + (update − reference) · min(1, max_norm / ‖Δ‖)`` where ``‖Δ‖`` is the L2
    norm over all factor differences (every A and B entry), plus ``‖Δ‖`` before clipping. This
    bounds the change in *factor space*, not of ``B A``: the product is bilinear in the factors, so
    no scaling of the factor deltas maps exactly to a bound on the product change. Factor-space
    clipping is what Flower's differential-privacy wrappers do to a client's parameters, so the
    two agree. Raises :class:`AdapterValidationError` if keys or shapes differ from the reference.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    problems = [f"missing key {k!r}" for k in sorted(set(reference) - set(update))]
    problems += [f"unexpected key {k!r}" for k in sorted(set(update) - set(reference))]
    problems += [
        f"{k}: shape {np.shape(update[k])} != expected {reference[k].shape}"
        for k in sorted(set(reference) & set(update))
        if np.shape(update[k]) != reference[k].shape
    ]
    if problems:
        raise AdapterValidationError(problems)
    deltas = {k: update[k].astype(np.float64) - reference[k] for k in reference}
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
    factor = 1.0 if norm <= max_norm else max_norm / norm
    clipped: AdapterState = {
        k: (reference[k].astype(np.float64) + factor * d).astype(np.float32)
        for k, d in deltas.items()
    }
    if factor < 1.0:
        log.debug("clipped factor update from %.6g to %.6g", norm, max_norm)
    return clipped, norm
