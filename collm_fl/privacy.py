"""Privacy accounting for the server's Gaussian noise: how much (ε, δ) a run has spent.

With ``dp-noise-multiplier`` z > 0 every node clips its update to L2 norm C (the ClientApp's
``dp_clipping_mod``, around Flower's ``fixedclipping_mod``) and the server adds Gaussian noise of
std z·C/n to the mean of the m updates of the nodes asked, n = ``min-train-nodes`` <= m
(Flower's ``DifferentialPrivacyClientSideFixedClipping``). A node that fails, is rejected or
trains nothing counts as a zero update in that mean (``strategies.lora``), so replacing one
node's whole contribution by none moves it by at most C/m <= C/n, and each noised
aggregate (a *release*) is a Gaussian mechanism with noise multiplier z: node-level privacy of
what a node's data does to the model, for *zero-out* neighbours (the nodes asked, a count the
server sees, are the same in both worlds). Under add-or-remove neighbours the mean's divisor
changes too and one node moves it by up to about 2C/m: the ε below would then be that of
multiplier z/2.

Gaussian mechanisms compose exactly in Gaussian differential privacy (Dong, Roth & Su 2022): a
release with multiplier z is μ-GDP with μ = 1/z, and any sequence of them (adaptively chosen)
is μ-GDP with μ = sqrt(Σ 1/z_i²). μ-GDP holds for (ε, δ(ε)) with

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)

(their Corollary 2.13), which this module inverts for ε. No amplification by sampling is
claimed (a node sampled in every round is the worst case), so the figure is an upper bound
whatever ``fraction-train`` is. The noise is calibrated for ``min-train-nodes`` updates; a
round with more replies has a smaller sensitivity for the same noise, so again an upper bound.
What nodes report besides their update (training loss, example counts, load) is not noised and
not counted here, as in Flower's own accountant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
EPSILON_CAP = 1e6  # beyond this, (ε, δ)-DP says nothing; reported as inf


def gdp_mu(noise_multipliers: Iterable[float]) -> float:
    """μ of the composition of Gaussian releases with these noise multipliers (each >= 0; 0 is
    a release without noise, which no later noise makes private: μ = inf)."""
    total = 0.0
    for z in noise_multipliers:
        if not (math.isfinite(z) and z >= 0):
            raise ValueError(f"a noise multiplier must be finite and >= 0, got {z}")
        if z == 0:
            return math.inf
        total += 1.0 / (z * z)
    return math.sqrt(total)


def _log_phi(x: float) -> float:
    """log Φ(x), the standard normal CDF, accurate far into the lower tail."""
    if x > -30:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2)))
    # Mills ratio: Φ(x) ≈ φ(x)/|x| · (1 − 1/x² + 3/x⁴) for x → −∞
    return -0.5 * x * x - math.log(-x) - _LOG_SQRT_2PI + math.log1p(-1 / x**2 + 3 / x**4)


def gdp_delta(mu: float, epsilon: float) -> float:
    """The smallest δ for which a μ-GDP mechanism is (ε, δ)-DP."""
    if mu == 0:
        return 0.0
    a = -epsilon / mu + mu / 2
    b = -epsilon / mu - mu / 2
    first = math.exp(_log_phi(a))
    second = math.exp(min(epsilon + _log_phi(b), 0.0))
    return max(first - second, 0.0)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε for which a μ-GDP mechanism is (ε, δ)-DP (inf past ``EPSILON_CAP``)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isinf(mu):
        return math.inf
    if mu == 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    if gdp_delta(mu, EPSILON_CAP) > delta:
        return math.inf
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:  # δ(ε) falls as ε grows
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return hi


def epsilon_spent(noise_multipliers: Iterable[float], delta: float) -> float:
    """ε at ``delta`` after releases with these noise multipliers (0 for none)."""
    return gdp_epsilon(gdp_mu(noise_multipliers), delta)
