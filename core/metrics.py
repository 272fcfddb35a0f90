"""The one metrics module: returns, risk-adjusted ratios, drawdowns, trade
statistics and tail risk (VaR, CVaR) for backtests, walk-forward folds,
Monte Carlo runs, the model registry and the risk manager.

Conventions, shared by every function here:

- Time runs along the last axis. Leading axes are independent series (``P``
  parameter sets, ``N`` Monte Carlo paths), so an ``[P, T]`` array gives
  ``[P]`` results.
- ``returns`` are simple per-period returns, ``equity[t] / equity[t-1] - 1``.
- Drawdowns are positive fractions: 0.25 means equity 25% below its running
  peak.
- VaR and CVaR are *returns* at the lower tail (a loss is negative), not loss
  amounts: ``cvar(r, 0.05)`` is the mean of the worst 5% of returns. For a
  normal distribution that is ``mu - 2.0627 sigma``.
- A ratio whose denominator is zero (no volatility, no drawdown, no losing
  trade) is NaN, except a profit factor with gains and no losses, which is
  +inf. Nothing is silently clipped.

``summary`` computes them all in one compiled pass per series; its kernels
are in ``core.metric_kernels`` (the engine calls them in its own loop).

What it is not: it does not simulate trading (that is ``core.engine``) or
decide which metric a search optimises (that is ``tune/``).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

# summary()'s compiled pass; its kernels and their output's names stay importable from here.
from core.metric_kernels import (  # noqa: F401
    MOMENT_NAMES,
    SUMMARY_NAMES,
    _smallest_first,
    _summary_rows,
    floor_ratio,
    returns_into,
    scratch_size,
    summary_core,
    summary_row,
)

TRADING_DAYS_PER_YEAR = 252


def _as_float(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def returns_from_equity(equity, initial: float | np.ndarray | None = None) -> np.ndarray:
    """Per-period simple returns of an equity curve ``[..., T]``.

    With ``initial`` (the cash before the first bar) the result has T entries,
    the first being ``equity[0] / initial - 1``; without it, T - 1.
    """
    equity = _as_float(equity)
    if initial is not None:
        prev = np.concatenate(
            [np.broadcast_to(_as_float(initial)[..., None], equity.shape[:-1] + (1,)), equity[..., :-1]], axis=-1
        )
    else:
        prev, equity = equity[..., :-1], equity[..., 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        # Once equity is gone (ruin) it stays 0; 0/0 is a zero return, not NaN.
        return np.where(prev != 0, equity / prev - 1.0, 0.0)


def total_return(returns) -> np.ndarray:
    """Compounded return over the whole series: prod(1 + r) - 1."""
    return np.prod(1.0 + _as_float(returns), axis=-1) - 1.0


def cagr(returns, periods_per_year: float = TRADING_DAYS_PER_YEAR) -> np.ndarray:
    """Compound annual growth rate, taking the series to span T / periods_per_year years.

    A series that loses everything has a CAGR of -1.
    """
    r = _as_float(returns)
    growth = np.prod(1.0 + r, axis=-1)
    years = r.shape[-1] / periods_per_year
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(growth > 0, np.power(np.maximum(growth, 0.0), 1.0 / years) - 1.0, -1.0)


def volatility(returns, periods_per_year: float = TRADING_DAYS_PER_YEAR) -> np.ndarray:
    """Annualised sample standard deviation (ddof=1) of returns."""
    return np.std(_as_float(returns), axis=-1, ddof=1) * np.sqrt(periods_per_year)


def sharpe(returns, periods_per_year: float = TRADING_DAYS_PER_YEAR, risk_free: float = 0.0) -> np.ndarray:
    """Annualised Sharpe ratio: mean excess return over its sample std (ddof=1), times sqrt(periods_per_year).

    ``risk_free`` is an annual rate, spread evenly over the periods.
    """
    excess = _as_float(returns) - risk_free / periods_per_year
    mean = excess.mean(axis=-1)
    std = excess.std(axis=-1, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(std > 0, mean / std * np.sqrt(periods_per_year), np.nan)


def sortino(returns, periods_per_year: float = TRADING_DAYS_PER_YEAR, target: float = 0.0) -> np.ndarray:
    """Annualised Sortino ratio: mean return above ``target`` over the downside deviation.

    Downside deviation is sqrt(mean(min(r - target, 0)^2)) over *all* periods
    (Sortino and Price's definition), so periods above target count as zero
    downside rather than being dropped.
    """
    excess = _as_float(returns) - target
    downside = np.sqrt(np.mean(np.minimum(excess, 0.0) ** 2, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(downside > 0, excess.mean(axis=-1) / downside * np.sqrt(periods_per_year), np.nan)


def drawdown(equity) -> np.ndarray:
    """Drawdown at each bar: 1 - equity / running peak (0 at a new high)."""
    equity = _as_float(equity)
    peak = np.maximum.accumulate(equity, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(peak > 0, 1.0 - equity / peak, 0.0)


def max_drawdown(equity) -> np.ndarray:
    """Largest peak-to-trough fall of an equity curve, as a positive fraction."""
    return drawdown(equity).max(axis=-1)


def equity_from_returns(returns, initial: float = 1.0) -> np.ndarray:
    """Equity curve ``[..., T + 1]`` starting at ``initial`` and compounding ``returns``."""
    r = _as_float(returns)
    growth = np.cumprod(1.0 + r, axis=-1)
    start = np.ones(r.shape[:-1] + (1,))
    return initial * np.concatenate([start, growth], axis=-1)


def calmar(returns, periods_per_year: float = TRADING_DAYS_PER_YEAR) -> np.ndarray:
    """CAGR over maximum drawdown (the drawdown of the compounded returns, start included)."""
    mdd = max_drawdown(equity_from_returns(returns))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mdd > 0, cagr(returns, periods_per_year) / mdd, np.nan)


def win_rate(trade_pnl) -> np.ndarray:
    """Fraction of closed trades with positive P&L. NaN entries are padding (no trade).

    A break-even trade (P&L exactly 0) is not a win. NaN when there are no trades.
    """
    pnl = _as_float(trade_pnl)
    n = np.sum(~np.isnan(pnl), axis=-1)
    wins = np.sum(pnl > 0, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, wins / np.maximum(n, 1), np.nan)


def profit_factor(trade_pnl) -> np.ndarray:
    """Gross profit over gross loss of closed trades (NaN entries are padding).

    +inf when there are gains and no losses; NaN when there is neither.
    """
    pnl = _as_float(trade_pnl)
    gains = np.nansum(np.where(pnl > 0, pnl, 0.0), axis=-1)
    losses = -np.nansum(np.where(pnl < 0, pnl, 0.0), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(losses > 0, gains / losses, np.where(gains > 0, np.inf, np.nan))


def exposure(positions) -> np.ndarray:
    """Fraction of bars with a non-zero position."""
    return np.mean(_as_float(positions) != 0, axis=-1)


def _tail_mass(n: int, alpha: float) -> float:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if n == 0:
        raise ValueError("need at least one return")
    m = n * alpha
    # n * alpha is often meant to be a whole number (20 * 0.05) but lands a
    # hair off it in floating point; snap so the boundary sample is weighted
    # as intended rather than by 1e-16.
    if abs(m - round(m)) < 1e-9 * max(1.0, m):
        m = float(round(m))
    return m


def _sorted_finite(returns) -> np.ndarray:
    r = _as_float(returns)
    if not np.all(np.isfinite(r)):
        # Sorting would push NaNs past the tail and quietly shrink it.
        raise ValueError("returns must be finite for VaR/CVaR")
    return np.sort(r, axis=-1)


def value_at_risk(returns, alpha: float = 0.05) -> np.ndarray:
    """Lower ``alpha``-quantile of returns (a return, negative for a loss).

    The smallest return r with P(R <= r) >= alpha under the empirical
    distribution, i.e. the ceil(n * alpha)-th smallest return.
    """
    x = _sorted_finite(returns)
    m = _tail_mass(x.shape[-1], alpha)
    k = int(np.ceil(m))
    return x[..., k - 1]


def cvar(returns, alpha: float = 0.05) -> np.ndarray:
    """Conditional value at risk: the mean of the worst ``alpha`` fraction of returns.

    Rockafellar and Uryasev's definition on the empirical distribution
    (each of the n returns has mass 1/n): the tail holds mass alpha, so the
    floor(n alpha) smallest returns count fully and the next one, the VaR
    atom, counts for the remaining fraction n alpha - floor(n alpha). This is
    correct when the quantile sits on a repeated value (an atom), where the
    naive "mean of returns <= VaR" over-counts the atom. Equivalently
    ``max_c { c - E[(c - R)^+] / alpha }``.
    """
    x = _sorted_finite(returns)
    m = _tail_mass(x.shape[-1], alpha)
    k = int(np.floor(m))
    frac = m - k
    tail = x[..., :k].sum(axis=-1)
    if frac > 0:
        tail = tail + frac * x[..., k]
    return tail / m


def tail_weights(n: int, alpha: float) -> np.ndarray:
    """For ``summary_core``: [whole returns in the alpha tail, weight of the boundary
    return, tail mass n * alpha, normal z-scores of 1.5, 2 and 1 times alpha]."""
    mass = _tail_mass(n, alpha)
    k = int(np.floor(mass))
    normal = NormalDist()
    return np.array([k, mass - k, mass, normal.inv_cdf(min(0.5, 1.5 * alpha)), normal.inv_cdf(min(0.5, 2.0 * alpha)),
                     normal.inv_cdf(min(0.5, alpha))])


def summary(
    equity,
    initial_cash: float,
    positions=None,
    trade_pnl=None,
    periods_per_year: float = TRADING_DAYS_PER_YEAR,
    alpha: float = 0.05,
) -> dict[str, np.ndarray]:
    """Every metric above for equity curves ``[..., T]`` that started at ``initial_cash``.

    Returns are measured from ``initial_cash``, so a loss on the first bar
    counts; the drawdown includes the starting cash as the first peak. Trade
    statistics need ``trade_pnl`` (closed trades, NaN-padded), exposure needs
    ``positions``; without them those entries are absent.

    This runs on every backtest of a parameter sweep, so it is one compiled
    pass per series rather than a dozen numpy passes; the tests hold it equal
    to the one-metric functions above, which remain the definitions.
    """
    equity = _as_float(equity)
    lead = equity.shape[:-1]
    T = equity.shape[-1]
    if T == 0:
        raise ValueError("need at least one bar of equity")
    if not np.all(np.isfinite(equity)):
        raise ValueError("equity must be finite")
    table = np.require(equity.reshape(-1, T), requirements=("C", "W"))
    P = table.shape[0]
    units = (np.require(_as_float(positions).reshape(P, T), requirements=("C", "W"))
             if positions is not None else np.zeros((P, 0)))
    pnl = (np.require(_as_float(trade_pnl).reshape(P, -1), requirements=("C", "W"))
           if trade_pnl is not None else np.full((P, 0), np.nan))
    out = np.empty((P, len(SUMMARY_NAMES)))
    _summary_rows(table, float(initial_cash), units, pnl, float(periods_per_year), tail_weights(T, alpha), out)
    result = {name: out[:, i].reshape(lead) for i, name in enumerate(SUMMARY_NAMES)}
    if positions is None:
        del result["exposure"]
    if trade_pnl is None:
        for name in ("n_trades", "win_rate", "profit_factor"):
            del result[name]
    return result
