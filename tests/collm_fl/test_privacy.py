"""The privacy accountant: Gaussian DP composition and its (ε, δ) conversion."""

import math

import pytest

from collm_fl.privacy import epsilon_spent, gdp_delta, gdp_epsilon, gdp_mu


def rdp_epsilon(z: float, releases: int, delta: float) -> float:
    """The classic Rényi-DP bound for the same releases (Mironov 2017), looser than GDP's."""
    orders = [1 + x / 20 for x in range(1, 4000)]
    return min(releases * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in orders)


def test_one_release_matches_the_analytic_gaussian_mechanism():
    # Balle & Wang (2018), Table 1: σ ≈ 3.73 (sensitivity 1) gives (1, 1e-5)-DP exactly.
    assert epsilon_spent([3.73], 1e-5) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(("z", "releases"), [(1.0, 10), (2.0, 50), (0.8, 3), (5.0, 1)])
def test_composition_is_tighter_than_the_renyi_bound_but_not_by_much(z, releases):
    gdp, rdp = epsilon_spent([z] * releases, 1e-5), rdp_epsilon(z, releases, 1e-5)
    assert gdp < rdp < 1.5 * gdp


def test_epsilon_and_delta_invert_each_other():
    for mu in (0.1, 1.0, 3.0, 20.0):
        for delta in (1e-3, 1e-5, 1e-9):
            eps = gdp_epsilon(mu, delta)
            assert gdp_delta(mu, eps) == pytest.approx(delta, rel=1e-6)


def test_more_releases_or_less_noise_spend_more():
    assert epsilon_spent([], 1e-5) == 0.0
    spent = [epsilon_spent([1.0] * t, 1e-5) for t in range(1, 8)]
    assert spent == sorted(spent) and len(set(spent)) == len(spent)
    assert epsilon_spent([0.5], 1e-5) > epsilon_spent([1.0], 1e-5)
    # Composition depends only on Σ 1/z²: two releases at z equal one at z/√2.
    assert epsilon_spent([2.0, 2.0], 1e-5) == pytest.approx(epsilon_spent([2 / math.sqrt(2)], 1e-5))
    assert gdp_mu([2.0, 2.0]) == pytest.approx(1 / math.sqrt(2))


def test_a_larger_delta_buys_a_smaller_epsilon():
    assert epsilon_spent([1.0] * 5, 1e-3) < epsilon_spent([1.0] * 5, 1e-5)


def test_hopeless_noise_reads_as_infinite_and_bad_inputs_are_refused():
    assert epsilon_spent([1e-4] * 100, 1e-5) == math.inf
    assert epsilon_spent([1.0, 0.0, 1.0], 1e-5) == math.inf  # one release without noise
    with pytest.raises(ValueError, match="noise multiplier"):
        epsilon_spent([-1.0], 1e-5)
    with pytest.raises(ValueError, match="noise multiplier"):
        epsilon_spent([math.nan], 1e-5)
    with pytest.raises(ValueError, match="delta"):
        epsilon_spent([1.0], 0.0)
