"""Robust LoRA aggregation: bound what one poisoned client can do to the global adapter.

:mod:`collm_fl.aggregation` computes a weighted *mean* of the clients' products, so a single client
moves the result as far as it likes within the norm bound, and by its claimed example count. Two
defences, both pure functions:

* :func:`cap_weights` caps each claimed ``num-examples`` at ``max_ratio × median(claimed)``. The
  median, not the mean or the maximum, because with ``K >= 3`` claims and fewer than half of them
  lying it stays between two honest claims: one liar among three or more cannot move it, whatever
  it claims. With ``K = 2`` the median is the mean of the two, so a liar sets it; capping is then
  no defence.
* :func:`aggregate_lora_robust` combines the clients' dense product changes
  ``D_k = B_k A_k − B_ref A_ref`` coordinate-wise with the median or a trimmed mean, and returns the
  best rank-r factors of ``B_ref A_ref + robust(D)``. A sign-flipped or scaled update is then one
  extreme value per coordinate among K, and is outvoted instead of averaged in. The weights are
  *not* used by these statistics (a client's vote does not grow with its claim), so an inflated
  ``num-examples`` buys nothing either.

Cost: unlike ``aggregate_lora_exact``, which never forms a ``d_out × d_in`` matrix, the
coordinate-wise statistics need every client's dense product: ``K × d_out × d_in`` float32 per
module (plus a copy for the partial sort), processed one module at a time, and a full SVD of the
``d_out × d_in`` result, ``O(d_out·d_in·min(d_out, d_in))``. For ``K = 10`` and 2048 × 2048 that is
~170 MB per module (twice that during the partial sort); at 4096 × 4096 with ``K = 100`` it is
6.7 GB. It is meant for models up to a hidden size of a few thousand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from collm_fl.adapters import MIN_ROBUST_UPDATES, AdapterState, lora_pairs, state_from_pairs
from collm_fl.aggregation import _client_pairs, normalized_weights
from collm_fl.errors import AdapterValidationError

log = logging.getLogger(__name__)

RobustMethod = Literal["median", "trimmed-mean"]
ROBUST_METHODS: tuple[str, ...] = ("median", "trimmed-mean")


def cap_weights(weights: Sequence[float], max_ratio: float) -> np.ndarray:
    """Each weight capped at ``max_ratio × median(weights)``, as float64 ``(K,)``.

    ``max_ratio <= 0`` turns the cap off (the weights come back unchanged); ``0 < max_ratio < 1``
    raises ``ValueError``, because it would cap the median client itself. Weights must be finite
    and ``>= 0``. The median resists one liar among three or more claims (see the module
    docstring); honest claims up to ``max_ratio`` times the typical one keep their weight.
    """
    w = np.asarray(weights, dtype=np.float64)  # (K,)
    if w.ndim != 1:
        raise ValueError(f"weights must be a flat sequence, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    if max_ratio <= 0 or w.size == 0:
        return w.copy()
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1 (or <= 0 for no cap), got {max_ratio}")
    return np.minimum(w, max_ratio * float(np.median(w)))


def _reference_problems(
    ref_pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> list[str]:
    """How the updates' modules and shapes differ from the reference's."""
    problems = [f"updates lack reference module {m}" for m in sorted(set(ref_pairs) - set(pairs))]
    problems += [f"updates have unexpected module {m}" for m in sorted(set(pairs) - set(ref_pairs))]
    for m in sorted(set(ref_pairs) & set(pairs)):
        (a_ref, b_ref), (a, b) = ref_pairs[m], pairs[m]
        if a.shape != a_ref.shape or b.shape != b_ref.shape:
            problems.append(
                f"{m}: updates have A {a.shape}, B {b.shape}; "
                f"reference has A {a_ref.shape}, B {b_ref.shape}"
            )
    return problems


def _coordinatewise(
    deltas: np.ndarray, method: RobustMethod, n_trim: int, p: np.ndarray
) -> np.ndarray:
    """Combine ``deltas`` ``(K, d_out, d_in)`` over K into ``(d_out, d_in)``."""
    k = deltas.shape[0]
    if k < MIN_ROBUST_UPDATES:  # the weighted mean: what the non-robust modes compute
        return np.tensordot(p.astype(deltas.dtype), deltas, axes=1)
    if method == "median":  # the mean of the two middle values for even K, as np.median
        return np.median(deltas, axis=0)
    if n_trim == 0:
        return deltas.mean(axis=0)
    # After partitioning at both cut points, rows n_trim .. K−n_trim−1 hold the middle values.
    part = np.partition(deltas, (n_trim, k - n_trim - 1), axis=0)  # (K, d_out, d_in)
    return part[n_trim : k - n_trim].mean(axis=0)


def _best_rank_factors(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A ``(rank, d_in)``, B ``(d_out, rank)``) with ``B @ A`` the best rank-``rank`` approx."""
    u, s, vh = torch.linalg.svd(torch.from_numpy(m), full_matrices=False)  # (d_out,q) (q,) (q,d_in)
    q = min(rank, s.shape[0])
    root = s[:q].sqrt()  # split σ evenly so A and B have equal norms
    d_out, d_in = m.shape
    b = np.zeros((d_out, rank), dtype=m.dtype)  # zero-padded where rank > min(d_out, d_in)
    a = np.zeros((rank, d_in), dtype=m.dtype)
    b[:, :q] = (u[:, :q] * root).numpy()
    a[:q] = (root[:, None] * vh[:q]).numpy()
    return a, b


def aggregate_lora_robust(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    reference: Mapping[str, np.ndarray],
    method: RobustMethod,
    trim_fraction: float = 0.2,
    rank: int | None = None,
) -> AdapterState:
    """Per module, the best rank-r factors of ``B_ref A_ref + robust_k(B_k A_k − B_ref A_ref)``.

    ``method``: ``"median"`` (coordinate-wise; the mean of the two middle values when K is even)
    or ``"trimmed-mean"`` (per coordinate, drop the ``⌊trim_fraction·K⌋`` largest and smallest
    values and average the rest; ``trim_fraction`` in ``[0, 0.5)``). ``weights`` are not used by
    either statistic: a robust vote does not grow with a client's claim. They are used only when
    ``K < 3``, where no statistic can tell an outlier from an honest update (the median of two is
    their mean): the result is then the weighted mean of the products, as in exact mode, and a
    warning is logged. A trimmed mean that trims nothing (``⌊trim_fraction·K⌋ = 0``, e.g. K = 4
    at 0.2) is the unweighted mean and is warned about too.

    Both statistics commute with adding a constant, so the result equals ``robust_k(B_k A_k)`` up
    to rounding; working on changes keeps the statistics on the quantity the norm checks bound.
    ``rank`` defaults to the updates' rank; singular values are split evenly (``B = U√S``,
    ``A = √S Vᵀ``) as in :func:`~collm_fl.aggregation.aggregate_lora_exact`, and extra columns
    beyond ``min(d_out, d_in)`` are zero. Dense float32 products, one module at a time: see the
    module docstring for the memory cost. Raises ``AdapterValidationError`` if the updates'
    modules or shapes differ from each other or from the reference.
    """
    if method not in ROBUST_METHODS:
        raise ValueError(f"method must be one of {', '.join(ROBUST_METHODS)}, got {method!r}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    p = normalized_weights(weights, len(updates))  # (K,)
    all_pairs = _client_pairs(updates)
    ref_pairs = lora_pairs(reference)
    problems = _reference_problems(ref_pairs, all_pairs[0])
    if problems:
        raise AdapterValidationError(problems)
    k = len(all_pairs)
    n_trim = int(trim_fraction * k)
    if k < MIN_ROBUST_UPDATES:
        log.warning(
            "robust %s needs >= %d updates to outvote one; with %d it is the weighted mean",
            method,
            MIN_ROBUST_UPDATES,
            k,
        )
    elif method == "trimmed-mean" and n_trim == 0:
        log.warning(
            "trimmed-mean of %d updates at trim-fraction %g trims nothing: it is the plain mean",
            k,
            trim_fraction,
        )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for m, (a_ref, b_ref) in ref_pairs.items():
        base = b_ref.astype(np.float32) @ a_ref.astype(np.float32)  # (d_out, d_in)
        deltas = np.empty((k, *base.shape), dtype=np.float32)  # (K, d_out, d_in)
        for i, pairs in enumerate(all_pairs):
            a_k, b_k = pairs[m]
            np.matmul(b_k.astype(np.float32), a_k.astype(np.float32), out=deltas[i])
            deltas[i] -= base
        combined = base + _coordinatewise(deltas, method, n_trim, p)  # (d_out, d_in)
        del deltas
        out[m] = _best_rank_factors(combined, a_ref.shape[0] if rank is None else rank)
    log.debug("robust-aggregated (%s) %d modules from %d updates", method, len(out), k)
    return state_from_pairs(out)
