"""LoRA aggregation math: pure functions from client adapter states to one global state.

Two modes:

* :func:`aggregate_lora_fedavg` averages A and B separately. Cheap, but the product of averages is
  not the average of products: ``mean(B) @ mean(A) != mean(B @ A)``, so it drifts from what the
  clients actually learned.
* :func:`aggregate_lora_exact` returns the best rank-r approximation (Eckart–Young) of the
  weighted sum of the clients' products ``M = Σ_k p_k · B_k @ A_k`` without ever forming the
  ``d_out × d_in`` matrix: it works on the stacked factors, whose QR factorisations shrink the
  problem to a core of at most ``K·r × K·r``.

Exact mode, per module, with ``B_cat = [B_1 … B_K]`` (d_out × K·r), ``A_cat = [A_1; …; A_K]``
(K·r × d_in) and ``P = diag(p_k repeated r times)``, so that ``M = B_cat P A_cat``:
thin QRs ``B_cat = Q_b R_b`` and ``A_catᵀ = Q_a R_a`` give ``M = Q_b (R_b P R_aᵀ) Q_aᵀ``; the
core ``C = R_b P R_aᵀ`` is at most K·r × K·r, and the best rank-r approximation of ``M`` is
``Q_b C_r Q_aᵀ`` with ``C_r`` the truncated SVD of ``C`` (Q_b, Q_a have orthonormal columns).

The LoRA scaling ``alpha / r`` multiplies every client's product by the same constant, so it factors
out of the sum and out of the truncation: we aggregate the unscaled ``B @ A`` and the server applies
the same scaling as the clients. This only holds when all clients share rank and alpha; the rank is
checked by the shapes (here and in :mod:`collm_fl.validation`), alpha comes from the run's shared
:class:`~collm_fl.adapters.LoraSpec`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from collm_fl.adapters import MAX_SERVER_LR, AdapterState, lora_pairs, state_from_pairs
from collm_fl.errors import AdapterValidationError

log = logging.getLogger(__name__)

ComputeDtype = Literal["float32", "float64"]

_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
_NP_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float64": np.float64}

Pairs = dict[str, tuple[np.ndarray, np.ndarray]]


def normalized_weights(weights: Sequence[float], n_updates: int) -> np.ndarray:
    """Weights as float64 summing to 1, one per update (e.g. from example counts).

    Raises ``ValueError`` when there are no updates, the counts differ, a weight is negative or
    not finite, or the total is not positive: each means the caller mixed up its inputs.
    """
    if n_updates == 0:
        raise ValueError("cannot aggregate zero updates")
    w = np.asarray(weights, dtype=np.float64)  # (K,)
    if w.shape != (n_updates,):
        raise ValueError(f"got {w.size} weights for {n_updates} updates")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    total = float(w.sum())
    if not (math.isfinite(total) and total > 0):  # (finite claims can still add up to inf)
        raise ValueError(f"weights must have a positive, finite total, got {total}")
    return w / total


MAX_STEP_RATIO = 4.0  # FedNova: a step count below the round's most / this counts as that much


def step_normalized(
    examples: Sequence[float], steps: Sequence[float | None], max_ratio: float = MAX_STEP_RATIO
) -> tuple[list[float], float]:
    """FedNova's normalized averaging (Wang et al., 2020) for updates that ran different numbers
    of local steps: the weights of the mean and the factor the server step is scaled by.

    FedAvg's mean Σ pₖΔₖ (pₖ ∝ examples) weighs each update by pₖ·τₖ in effect, τₖ its steps:
    an update cut short (by its deadline, or by a small budget the allocation gave a busy
    replica) barely moves and drags the mean back toward the old version, and the mean leans
    toward the objectives of the nodes that trained most. FedNova averages the per-step updates
    Δₖ/τₖ with weights pₖ and moves τ_eff = Σ pₖτₖ steps along them: as a weighted mean of the
    states that is weights ∝ pₖ/τₖ and a server step scaled by (Σ pₖτₖ)(Σ pₖ/τₖ) ≥ 1. When
    every update ran the same steps this is FedAvg exactly (weights pₖ, factor 1); when a reply
    does not say how many steps it ran (an external client), FedAvg's weights are used.

    A step count is the node's own claim, and dividing by it is a lever: a node claiming 1e-6
    steps would take the whole mean and the largest server step. So τₖ counts as at least the
    round's most / ``max_ratio``: a claim can raise an update's share of the step at most
    ``max_ratio`` times its FedAvg share (as ``max-weight-ratio`` bounds claimed examples), and
    the factor is at most ``max_ratio``. That also bounds how far one noisy step of an honest
    busy replica is extrapolated.
    """
    if len(examples) != len(steps):
        raise ValueError(f"got {len(steps)} step counts for {len(examples)} updates")
    p = np.asarray(examples, dtype=np.float64)
    if not steps or any(s is None or not s > 0 for s in steps) or not p.sum() > 0:
        return [float(e) for e in examples], 1.0
    if len(set(steps)) == 1:  # FedAvg exactly (not up to rounding: a factor of 1 is no step)
        return [float(e) for e in examples], 1.0
    tau = np.asarray(steps, dtype=np.float64)
    tau = np.maximum(tau, tau.max() / max_ratio)
    p = p / p.sum()
    w = p / tau
    return (w / w.sum()).tolist(), float((p * tau).sum() * w.sum())


def _client_pairs(updates: Sequence[Mapping[str, np.ndarray]]) -> list[Pairs]:
    """Every update's (A, B) pairs; raises unless all match the first update's modules/shapes."""
    all_pairs = [lora_pairs(u) for u in updates]
    first = all_pairs[0]
    problems: list[str] = []
    for k, pairs in enumerate(all_pairs[1:], start=1):
        missing = sorted(set(first) - set(pairs))
        extra = sorted(set(pairs) - set(first))
        problems += [f"update {k}: missing module {m}" for m in missing]
        problems += [f"update {k}: unexpected module {m}" for m in extra]
        for m in sorted(set(first) & set(pairs)):
            (a0, b0), (a, b) = first[m], pairs[m]
            if a.shape != a0.shape or b.shape != b0.shape:
                problems.append(
                    f"update {k}: {m} has A {a.shape}, B {b.shape}; "
                    f"update 0 has A {a0.shape}, B {b0.shape}"
                )
    for m, (a, b) in first.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{m}: A {a.shape} and B {b.shape} are not (r, d_in) and (d_out, r)")
    if problems:
        raise AdapterValidationError(problems)
    return all_pairs


def check_server_lr(server_lr: float) -> None:
    """Raise ``ValueError`` unless ``server_lr`` is in (0, MAX_SERVER_LR].

    η = 1 is plain FedAvg. η > 1 extrapolates along the mean update: K clients that each ran
    s steps from the same start move the model about as far as one client running s steps, while
    one client running K·s steps in sequence moves it about K times as far; to first order η = K
    recovers that distance (the sum of the clients' updates). Measured on SmolLM2 with AdamW
    restarted each round, K = 2 needed η = 3 to match the sequential trainer in every round
    (docs/bench/server_lr.md). η < 1 damps noisy rounds.
    """
    if not (math.isfinite(server_lr) and 0.0 < server_lr <= MAX_SERVER_LR):
        raise ValueError(f"server_lr must be in (0, {MAX_SERVER_LR:g}], got {server_lr}")


def _with_reference(
    updates: Sequence[Mapping[str, np.ndarray]],
    p: np.ndarray,
    server_lr: float,
    reference: Mapping[str, np.ndarray] | None,
) -> tuple[Sequence[Mapping[str, np.ndarray]], np.ndarray]:
    """The updates and signed weights of ``ref + η·(Σ p_k u_k − ref)``: the reference is one more
    term, weighted ``1 − η`` (unchanged when η = 1)."""
    check_server_lr(server_lr)
    if server_lr == 1.0:
        return updates, p
    if reference is None:
        raise ValueError("server_lr != 1 needs the reference state the clients started from")
    return [*updates, reference], np.append(server_lr * p, 1.0 - server_lr)


def aggregate_lora_fedavg(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    server_lr: float = 1.0,
    reference: Mapping[str, np.ndarray] | None = None,
) -> AdapterState:
    """Weighted mean of the A factors and, separately, of the B factors (classic FedAvg on LoRA).

    With ``server_lr`` η and ``reference``: ``A = A_ref + η·(mean A − A_ref)``, likewise for B.
    """
    p = normalized_weights(weights, len(updates))
    updates, p = _with_reference(updates, p, server_lr, reference)
    all_pairs = _client_pairs(updates)
    out: Pairs = {}
    for m in all_pairs[0]:
        a_acc = np.zeros(all_pairs[0][m][0].shape, dtype=np.float64)  # (r, d_in)
        b_acc = np.zeros(all_pairs[0][m][1].shape, dtype=np.float64)  # (d_out, r)
        for pk, pairs in zip(p, all_pairs, strict=True):
            a_acc += pk * pairs[m][0]
            b_acc += pk * pairs[m][1]
        out[m] = (a_acc, b_acc)
    return state_from_pairs(out)


def _geqrf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR of a batch ``(G, m, n)``: reflectors, tau and R ``(G, min(m, n), n)``.

    Q stays implicit (applied later with ``ormqr``): forming it would cost as much as the QR itself.
    """
    k = min(x.shape[-2], x.shape[-1])
    h, tau = torch.geqrf(x)  # h (G, m, n), tau (G, k)
    r_fac = torch.triu(h[..., :k, :])  # (G, k, n)
    return h[..., :k], tau, r_fac  # reflectors (G, m, k)


def _apply_q(h: torch.Tensor, tau: torch.Tensor, y_small: torch.Tensor, rows: int) -> torch.Tensor:
    """``Q @ y_small`` for the reduced Q of :func:`_geqrf`: ``(G, k, c)`` -> ``(G, rows, c)``."""
    g, k, c = y_small.shape
    y = torch.zeros(g, rows, c, dtype=y_small.dtype)  # (G, m, c): [y_small; 0]
    y[:, :k, :] = y_small
    return torch.ormqr(h, tau, y)  # (G, m, c)


def _exact_batch(
    b_cat_t: np.ndarray, a_cat: np.ndarray, p_rep: np.ndarray, rank: int, dtype: ComputeDtype
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors of ``B_cat diag(p_rep) A_cat`` for a batch of same-shape modules.

    ``b_cat_t`` is ``B_cat`` transposed, ``(G, K·r, d_out)``; ``a_cat`` is ``(G, K·r, d_in)``.
    Both are passed row-major so that their transposes are already column-major for LAPACK.
    """
    tdt = _TORCH_DTYPES[dtype]
    d_out, d_in = b_cat_t.shape[-1], a_cat.shape[-1]
    b_cat = torch.from_numpy(b_cat_t).mT  # (G, d_out, Kr)
    a_cat_tr = torch.from_numpy(a_cat).mT  # (G, d_in, Kr)
    h_b, tau_b, r_b = _geqrf(b_cat)  # r_b (G, kb, Kr), kb = min(d_out, Kr)
    h_a, tau_a, r_a = _geqrf(a_cat_tr)  # r_a (G, ka, Kr), ka = min(d_in, Kr)
    p = torch.from_numpy(p_rep).to(tdt)  # (Kr,)
    core = (r_b * p) @ r_a.mT  # (G, kb, ka): M = Q_b core Q_aᵀ
    # Top-r left singular subspace of the core from its Gram matrix: a symmetric eigenproblem is
    # ~2.5x cheaper than a full SVD of the core and needs far less LAPACK workspace.
    _, vecs = torch.linalg.eigh(core @ core.mT)  # (G, kb, kb), eigenvalues ascending
    keep = min(rank, vecs.shape[-1])
    u_top = vecs[..., -keep:]  # (G, kb, keep)
    # Projecting the core onto that subspace is its truncated SVD; a small SVD of the projection
    # gives the singular values exactly (not squared) and their split between A and B.
    w, s, vh = torch.linalg.svd(u_top.mT @ core, full_matrices=False)  # (G,keep,q) (G,q) (G,q,ka)
    q = s.shape[-1]
    root = s.clamp_min(0).sqrt()  # (G, q); split σ evenly so A and B have equal norms
    left = torch.zeros(core.shape[0], core.shape[1], rank, dtype=tdt)  # (G, kb, rank), zero-padded
    left[..., :q] = u_top @ (w * root[:, None, :])
    right = torch.zeros(core.shape[0], core.shape[2], rank, dtype=tdt)  # (G, ka, rank), zero-padded
    right[..., :q] = vh.mT * root[:, None, :]
    new_b = _apply_q(h_b, tau_b, left, d_out)  # (G, d_out, rank)
    new_a = _apply_q(h_a, tau_a, right, d_in).mT  # (G, rank, d_in)
    return new_a.numpy(), new_b.numpy()


def aggregate_lora_exact(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    rank: int | None = None,
    *,
    compute_dtype: ComputeDtype = "float32",
    modules_per_batch: int = 8,
    server_lr: float = 1.0,
    reference: Mapping[str, np.ndarray] | None = None,
) -> AdapterState:
    """Per module, the best rank-r approximation of ``Σ_k p_k · B_k @ A_k`` as (A, B) factors.

    ``rank`` defaults to the updates' own rank. The result is optimal in Frobenius norm (up to
    floating point), unlike FedAvg of the factors, and costs ``O(d·(K·r)²)`` per module instead of
    the ``O(d²·K·r)`` of forming the dense sum. Singular values are split evenly (``B = U√S``,
    ``A = √S Vᵀ``) so the factors stay balanced for the next round of training. Where the sum has
    rank below ``rank`` (e.g. all-zero B in round 1, or K·r < rank) the extra rows/columns are zero.

    ``compute_dtype``: float32 is the default because it is about twice as fast on CPU and its
    error against the optimum is far below what training notices (see the aggregation benchmark);
    float64 is there for checks. Modules of equal shape are processed ``modules_per_batch`` at a
    time (a batch of K·r × d matrices per factor, ~200 MB at K=100, r=16, d=4096 in float32).

    ``server_lr`` (η) with ``reference`` (the global adapter the clients started from): a server
    step in product space, ``M = M_ref + η·(Σ_k p_k M_k − M_ref)``, truncated once to rank r; the
    reference enters the stacked factors as one more term with weight ``1 − η`` (see
    :func:`check_server_lr`).
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if modules_per_batch < 1:
        raise ValueError(f"modules_per_batch must be >= 1, got {modules_per_batch}")
    p = normalized_weights(weights, len(updates))
    updates, p = _with_reference(updates, p, server_lr, reference)
    all_pairs = _client_pairs(updates)
    groups: dict[tuple[int, int, int], list[str]] = {}
    for m, (a, b) in all_pairs[0].items():
        groups.setdefault((b.shape[0], a.shape[1], a.shape[0]), []).append(m)
    npdt = _NP_DTYPES[compute_dtype]
    n_clients = len(all_pairs)
    out: Pairs = {}
    for (d_out, d_in, r_in), modules in groups.items():
        r_out = r_in if rank is None else rank
        p_rep = np.repeat(p, r_in)  # (K·r,): client k's weight on each of its r rank-1 terms
        for start in range(0, len(modules), modules_per_batch):
            chunk = modules[start : start + modules_per_batch]
            b_cat_t = np.empty((len(chunk), n_clients * r_in, d_out), dtype=npdt)  # (G, Kr, d_out)
            a_cat = np.empty((len(chunk), n_clients * r_in, d_in), dtype=npdt)  # (G, Kr, d_in)
            for g, m in enumerate(chunk):
                for k, pairs in enumerate(all_pairs):
                    a_k, b_k = pairs[m]
                    a_cat[g, k * r_in : (k + 1) * r_in] = a_k
                    b_cat_t[g, k * r_in : (k + 1) * r_in] = b_k.T
            new_a, new_b = _exact_batch(b_cat_t, a_cat, p_rep, r_out, compute_dtype)
            for g, m in enumerate(chunk):
                out[m] = (new_a[g], new_b[g])
        log.debug("exact-aggregated %d modules of shape (%d, %d)", len(modules), d_out, d_in)
    return state_from_pairs(out)


def lora_delta_norm(
    a_new: np.ndarray, b_new: np.ndarray, a_old: np.ndarray, b_old: np.ndarray
) -> float:
    """``‖B_new A_new − B_old A_old‖_F`` without forming a ``d_out × d_in`` matrix.

    The difference is itself a low-rank product ``[B_new, −B_old] @ [A_new; A_old]``; with thin QRs
    of the two stacked factors its norm is that of a ``2r × 2r`` matrix. (Expanding the square
    into Gram-matrix traces gives the same value but cancels catastrophically when the change is
    small compared with the products, which is the usual case in late rounds.)
    """
    b_s = np.concatenate([b_new, -b_old], axis=1).astype(np.float64)  # (d_out, r_n + r_o)
    a_s = np.concatenate([a_new, a_old], axis=0).astype(np.float64)  # (r_n + r_o, d_in)
    r_b = np.linalg.qr(b_s).R  # (kb, r_n + r_o)
    r_a = np.linalg.qr(a_s.T).R  # (ka, r_n + r_o)
    return float(np.linalg.norm(r_b @ r_a.T))  # ‖Q_b R_b R_aᵀ Q_aᵀ‖ = ‖R_b R_aᵀ‖


def factor_delta_norm(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> float:
    """The L2 norm of an update's change in factor space, over every A and B entry it shares
    with ``reference``: what FedAvg-mode averaging moves (it averages the factors)."""
    sq = 0.0
    for key, ref in reference.items():
        if key in update:
            d = np.asarray(update[key], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
            sq += float(np.sum(d * d))
    return math.sqrt(sq)


def dense_lora_sum(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Module prefix -> dense float64 ``Σ_k p_k B_k @ A_k`` (d_out, d_in); tests/benchmarks only."""
    p = normalized_weights(weights, len(updates))
    all_pairs = _client_pairs(updates)
    out: dict[str, np.ndarray] = {}
    for m in all_pairs[0]:
        r = all_pairs[0][m][0].shape[0]
        b_cat = np.concatenate([pairs[m][1] for pairs in all_pairs], axis=1)  # (d_out, K·r)
        a_cat = np.concatenate([pairs[m][0] for pairs in all_pairs], axis=0)  # (K·r, d_in)
        b_w = b_cat.astype(np.float64) * np.repeat(p, r)  # (d_out, K·r)
        out[m] = b_w @ a_cat.astype(np.float64)  # (d_out, d_in)
    return out
