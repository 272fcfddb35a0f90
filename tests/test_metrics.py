"""core.metrics against numbers worked out by hand."""

import math

import numpy as np
import pytest

from core import metrics as m


def test_drawdown_by_hand():
    equity = [100.0, 120.0, 90.0, 110.0, 60.0, 130.0]
    # Running peaks 100, 120, 120, 120, 120, 130.
    np.testing.assert_allclose(m.drawdown(equity), [0, 0, 0.25, 1 - 110 / 120, 0.5, 0])
    assert m.max_drawdown(equity) == pytest.approx(0.5)
    assert m.max_drawdown([1.0, 2.0, 3.0]) == 0.0


def test_total_return_and_cagr():
    r = [0.10, -0.10]
    # 1.1 * 0.9 = 0.99.
    assert m.total_return(r) == pytest.approx(-0.01)
    assert m.cagr(r, periods_per_year=2) == pytest.approx(-0.01)  # one year
    assert m.cagr(r, periods_per_year=1) == pytest.approx(math.sqrt(0.99) - 1)  # two years
    assert m.cagr([0.5, -1.0], periods_per_year=1) == -1.0  # wiped out


def test_sharpe_and_sortino_by_hand():
    r = [0.01, 0.03, -0.01, 0.05]
    # mean 0.02; deviations -0.01, 0.01, -0.03, 0.03 -> sum of squares 0.002, ddof=1 variance 0.002/3.
    assert m.sharpe(r) == pytest.approx(0.02 / math.sqrt(0.002 / 3) * math.sqrt(252))
    # Downside: only -0.01 is below 0 -> sqrt(0.0001 / 4) = 0.005; 0.02 / 0.005 = 4.
    assert m.sortino(r) == pytest.approx(4 * math.sqrt(252))
    assert m.sharpe(r, periods_per_year=12) == pytest.approx(0.02 / math.sqrt(0.002 / 3) * math.sqrt(12))
    # An annual risk-free of 252 * 0.02 makes the mean excess return zero.
    assert m.sharpe(r, risk_free=252 * 0.02) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(m.sharpe([0.01, 0.01, 0.01]))
    assert np.isnan(m.sortino([0.01, 0.02]))


def test_calmar_by_hand():
    r = [0.10, -0.50, 0.20]
    # Growth 1.1 * 0.5 * 1.2 = 0.66 over one year (3 periods) -> CAGR -0.34;
    # equity 1, 1.1, 0.55, 0.66 -> max drawdown 0.5.
    assert m.calmar(r, periods_per_year=3) == pytest.approx(-0.34 / 0.5)


def test_trade_statistics():
    pnl = [10.0, -5.0, 0.0, 20.0, np.nan]  # NaN is padding, 0 is a break-even trade
    assert m.win_rate(pnl) == 0.5
    assert m.profit_factor(pnl) == pytest.approx(30 / 5)
    assert m.profit_factor([3.0, 4.0]) == np.inf
    assert np.isnan(m.profit_factor([np.nan, np.nan]))
    assert np.isnan(m.win_rate([np.nan]))
    assert m.exposure([0, 1, -1, 0.5, 0]) == pytest.approx(3 / 5)


def test_cvar_weights_the_quantile_atom_fractionally():
    r = np.array([-0.10, -0.05, -0.05, -0.05, 0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
    # alpha 0.25 of 10 returns is 2.5 returns: -0.10 and -0.05 whole, half of another -0.05.
    assert m.cvar(r, 0.25) == pytest.approx((-0.10 - 0.05 - 0.5 * 0.05) / 2.5)  # -0.07
    assert m.value_at_risk(r, 0.25) == -0.05  # the 3rd smallest
    # The naive "mean of returns <= VaR" counts all three -0.05s: -0.0625, not -0.07.
    naive = r[r <= m.value_at_risk(r, 0.25)].mean()
    assert naive == pytest.approx(-0.0625) and abs(naive - m.cvar(r, 0.25)) > 0.005
    assert m.cvar(r, 0.10) == pytest.approx(-0.10)
    assert m.cvar(r, 0.20) == pytest.approx(-0.075)
    assert m.cvar(r, 1.0) == pytest.approx(r.mean())


def test_cvar_of_a_two_point_distribution():
    # P(-1) = 0.1, P(0) = 0.9. The worst 5% lies wholly on the atom at -1; the
    # worst 20% is half on -1, half on 0.
    r = np.array([-1.0] * 10 + [0.0] * 90)
    assert m.cvar(r, 0.05) == pytest.approx(-1.0)
    assert m.cvar(r, 0.20) == pytest.approx(-0.5)
    assert m.value_at_risk(r, 0.20) == 0.0
    assert r[r <= 0.0].mean() == pytest.approx(-0.1)  # what the naive definition would say


def test_cvar_equals_the_rockafellar_uryasev_optimum():
    rng = np.random.default_rng(11)
    r = rng.standard_t(3, size=997) * 0.01
    alpha = 0.037  # 36.889 returns: a fractional boundary weight
    # CVaR_a = max over c of c - E[(c - R)^+] / a; the maximum is at a sample point.
    objective = [c - np.mean(np.maximum(c - r, 0.0)) / alpha for c in r]
    assert m.cvar(r, alpha) == pytest.approx(max(objective), rel=1e-12)


def test_normal_cvar_is_mu_minus_2_0627_sigma():
    # For a normal, CVaR_0.05 = mu - sigma * phi(z) / 0.05 with z = 1.644854:
    # phi(z) = exp(-z^2 / 2) / sqrt(2 pi) = 0.103136, / 0.05 = 2.0627.
    # VaR_0.05 = mu - 1.6449 sigma.
    mu, sigma, n = 0.001, 0.02, 400_000
    r = np.random.default_rng(5).normal(mu, sigma, n)
    # The estimator's standard error is about sigma * 0.6 / sqrt(n * 0.05) = 8.5e-5; allow ~4.
    assert m.cvar(r, 0.05) == pytest.approx(mu - 2.0627 * sigma, abs=3.5e-4)
    assert m.value_at_risk(r, 0.05) == pytest.approx(mu - 1.6449 * sigma, abs=3.5e-4)


def test_metrics_are_vectorised_over_a_leading_axis():
    rng = np.random.default_rng(2)
    r = rng.normal(0.0005, 0.01, size=(3, 250))
    for name in ("total_return", "sharpe", "sortino", "calmar", "volatility"):
        f = getattr(m, name)
        np.testing.assert_allclose(f(r), [f(row) for row in r], rtol=1e-12)
    np.testing.assert_allclose(m.cvar(r, 0.05), [m.cvar(row, 0.05) for row in r], rtol=1e-12)
    np.testing.assert_allclose(m.value_at_risk(r, 0.05), [m.value_at_risk(row, 0.05) for row in r])
    equity = 100 * np.cumprod(1 + r, axis=1)
    np.testing.assert_allclose(m.max_drawdown(equity), [m.max_drawdown(row) for row in equity])


def test_summary_measures_returns_from_the_starting_cash():
    # 1000 -> 900 on the first bar is a -10% return that must count.
    s = m.summary(np.array([900.0, 990.0]), 1000.0)
    assert s["total_return"] == pytest.approx(-0.01)
    assert s["max_drawdown"] == pytest.approx(0.1)
    np.testing.assert_allclose(m.returns_from_equity([900.0, 990.0], 1000.0), [-0.1, 0.1])


def test_tail_measures_refuse_nan_and_bad_alpha():
    with pytest.raises(ValueError):
        m.cvar([0.1, np.nan, -0.2], 0.5)
    with pytest.raises(ValueError):
        m.cvar([0.1, -0.2], 0.0)
    with pytest.raises(ValueError):
        m.value_at_risk([0.1, -0.2], 1.5)


def test_compiled_summary_equals_the_one_metric_functions():
    rng = np.random.default_rng(9)
    P, T = 5, 301
    equity = 1000 * np.cumprod(1 + rng.normal(0.0004, 0.012, size=(P, T)), axis=1)
    equity[2, 150:] = 0.0  # a ruined account
    equity[3] = 1000.0  # mostly flat: the tail is an atom of zero returns...
    equity[3, 100:103] = [990.0, 1010.0, 980.0]  # ...and three real moves
    equity[4, ::2] *= 1.05  # a sawtooth: half the returns sit far below the mean
    positions = rng.integers(-1, 2, size=(P, T)).astype(float)
    pnl = np.where(rng.random((P, 12)) < 0.8, rng.normal(0, 10, (P, 12)), np.nan)
    for alpha in (0.05, 0.1, 43 / 301, 301 / 301):  # fractional boundary weights, then whole ones
        s = m.summary(equity, 1000.0, positions=positions, trade_pnl=pnl, periods_per_year=252, alpha=alpha)
        r = m.returns_from_equity(equity, 1000.0)
        curve = np.concatenate([np.full((P, 1), 1000.0), equity], axis=1)
        expected = {
            "final_equity": equity[:, -1],
            "total_return": m.total_return(r),
            "cagr": m.cagr(r),
            "volatility": m.volatility(r),
            "sharpe": m.sharpe(r),
            "sortino": m.sortino(r),
            "max_drawdown": m.max_drawdown(curve),
            "calmar": m.calmar(r),
            "var": m.value_at_risk(r, alpha),
            "cvar": m.cvar(r, alpha),
            "exposure": m.exposure(positions),
            "n_trades": np.sum(~np.isnan(pnl), axis=1),
            "win_rate": m.win_rate(pnl),
            "profit_factor": m.profit_factor(pnl),
        }
        assert set(s) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(s[name], value, rtol=1e-9, atol=1e-14, err_msg=name)
    assert m.summary(equity[0], 1000.0)["sharpe"].shape == ()
