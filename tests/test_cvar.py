"""The empirical VaR/CVaR estimator against answers worked out by hand and closed forms."""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.rl.cvar import empirical_cvar, empirical_var

torch.set_num_threads(1)


def _bandit_a_sample() -> torch.Tensor:
    # Exactly the distribution of arm A: +2 w.p. 0.95, -20 w.p. 0.05.
    return torch.tensor([2.0] * 95 + [-20.0] * 5, dtype=torch.float64)


def test_atom_at_the_quantile_gets_the_fractional_weight():
    r = _bandit_a_sample()
    cvar, nu = empirical_cvar(r, 0.1)
    assert nu.item() == 2.0
    # Worst 10% = 5% at -20 and 5% at +2.
    assert cvar.item() == pytest.approx(-9.0, abs=1e-12)
    # The naive "mean of R <= VaR" is the whole mean here, 0.9: the case the formula exists for.
    naive = r[r <= nu].mean().item()
    assert naive == pytest.approx(0.9)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.5, 11 / 15, 0.9, 0.95, 1.0])
def test_bandit_arm_a_matches_closed_form(alpha):
    # CVaR_a(A) = (0.05 * -20 + (a - 0.05) * 2) / a = 2 - 1.1 / a for a >= 0.05.
    cvar, _ = empirical_cvar(_bandit_a_sample(), alpha)
    assert cvar.item() == pytest.approx(2.0 - 1.1 / alpha, abs=1e-12)


def test_arm_a_crosses_arm_b_at_eleven_fifteenths():
    r = _bandit_a_sample()
    assert empirical_cvar(r, 11 / 15)[0].item() == pytest.approx(0.5, abs=1e-12)
    assert empirical_cvar(r, 0.5)[0].item() < 0.5 < empirical_cvar(r, 0.95)[0].item()


def test_below_the_lowest_atom_cvar_is_that_atom():
    cvar, nu = empirical_cvar(_bandit_a_sample(), 0.03)
    assert nu.item() == -20.0 and cvar.item() == -20.0


def test_fractional_order_statistic_by_hand():
    r = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    # n*alpha = 1.5: all of r_(1)=1 and half of r_(2)=2, over 1.5 -> 4/3.
    cvar, nu = empirical_cvar(r, 0.5)
    assert nu.item() == 2.0
    assert cvar.item() == pytest.approx(4.0 / 3.0, abs=1e-12)
    # alpha = 1/3 exactly one observation: no float round-up to the second one.
    assert empirical_var(r, 1 / 3).item() == 1.0
    assert empirical_cvar(r, 1 / 3)[0].item() == pytest.approx(1.0, abs=1e-12)


def test_alpha_one_is_the_mean_and_var_the_max():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(1001, generator=g, dtype=torch.float64)
    cvar, nu = empirical_cvar(r, 1.0)
    assert cvar.item() == pytest.approx(r.mean().item(), abs=1e-12)
    assert nu.item() == r.max().item()


def _cvar_by_order_statistics(values: list[int], alpha: Fraction) -> Fraction:
    """Independent oracle: (sum_{i<=k} r_(i) + (n a - k) r_(k+1)) / (n a), in exact arithmetic."""
    r = sorted(values)
    n = len(r)
    na = n * alpha
    k = math.floor(na)
    total = Fraction(sum(r[:k])) + (na - k) * (r[k] if k < n else 0)
    return total / na


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(-5, 5), min_size=1, max_size=40),
    num=st.integers(1, 20),
    den=st.integers(1, 20),
)
def test_matches_exact_order_statistic_formula_with_ties(values, num, den):
    alpha = Fraction(min(num, den), den)
    got, nu = empirical_cvar(torch.tensor(values, dtype=torch.float64), float(alpha))
    want = _cvar_by_order_statistics(values, alpha)
    assert got.item() == pytest.approx(float(want), abs=1e-9)
    # CVaR never exceeds VaR nor the mean.
    assert got.item() <= nu.item() + 1e-9
    assert got.item() <= sum(values) / len(values) + 1e-9


def test_monotone_in_alpha_and_permutation_invariant():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(-3, 4, (500,), generator=g).to(torch.float64)
    alphas = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0]
    cvars = [empirical_cvar(r, a)[0].item() for a in alphas]
    assert all(a <= b + 1e-12 for a, b in zip(cvars, cvars[1:]))
    shuffled = r[torch.randperm(500, generator=g)]
    assert empirical_cvar(shuffled, 0.1)[0].item() == pytest.approx(cvars[2], abs=1e-12)


def _standard_error(r: torch.Tensor, alpha: float) -> float:
    # Asymptotic sd of the empirical CVaR: sd((nu - R)^+) / (alpha sqrt(n)).
    nu = empirical_var(r, alpha)
    return ((nu - r).clamp(min=0).std() / (alpha * math.sqrt(r.numel()))).item()


@pytest.mark.parametrize("alpha,k", [(0.05, 2.0627), (0.1, 1.7550)])
def test_normal_within_sampling_error(alpha, k):
    nd = NormalDist()
    # Closed form CVaR_a = mu - sigma phi(z_a) / a; the brief's constants, rechecked.
    assert nd.pdf(nd.inv_cdf(alpha)) / alpha == pytest.approx(k, abs=1e-4)
    mu, sigma = 0.3, 2.0
    g = torch.Generator().manual_seed(2)
    r = mu + sigma * torch.randn(200_000, generator=g, dtype=torch.float64)
    cvar, nu = empirical_cvar(r, alpha)
    assert abs(cvar.item() - (mu - k * sigma)) < 4 * _standard_error(r, alpha)
    assert nu.item() == pytest.approx(mu + sigma * nd.inv_cdf(alpha), abs=0.03)


def test_random_sample_from_atoms_within_sampling_error():
    # 0 w.p. 0.3, 1 w.p. 0.4, 10 w.p. 0.3: CVaR_0.5 = (0.3 * 0 + 0.2 * 1) / 0.5 = 0.4.
    g = torch.Generator().manual_seed(3)
    u = torch.rand(100_000, generator=g, dtype=torch.float64)
    r = torch.where(u < 0.3, 0.0, torch.where(u < 0.7, 1.0, 10.0)).to(torch.float64)
    cvar, nu = empirical_cvar(r, 0.5)
    assert nu.item() == 1.0
    assert abs(cvar.item() - 0.4) < 4 * _standard_error(r, 0.5)


def test_float32_input_stays_float32():
    cvar, nu = empirical_cvar(_bandit_a_sample().float(), 0.1)
    assert cvar.dtype == torch.float32 and nu.dtype == torch.float32
    assert cvar.item() == pytest.approx(-9.0, abs=1e-5)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        empirical_cvar(torch.ones(3), alpha)


def test_rejects_empty_or_matrix_input():
    with pytest.raises(ValueError, match="1-D"):
        empirical_cvar(torch.ones(0), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        empirical_cvar(torch.ones(2, 2), 0.5)
