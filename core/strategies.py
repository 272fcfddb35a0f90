"""Rule strategies: bars (and parameters) in, target positions in [-1, 1] out.

Each strategy returns the position it wants to hold *after* bar ``t``'s close,
decided from bars ``<= t`` only; the engine decides when that target is
filled (next open by default). ``+1`` is fully long, ``-1`` fully short, ``0``
flat. The ensemble uses these same functions as its rule members, and Tune
sweeps them, so every strategy is vectorised over parameter sets: pass arrays
of parameters (broadcast together to length ``P``) and get ``[P, T]``; pass
scalars and get ``[T]``.

Strategies are *stateful* where the rule is (a breakout holds its position
until an exit condition, not just while the entry condition lasts), so the
inner loops are compiled with numba.

This module does not size orders, charge costs or compute P&L (``core.engine``),
and it does not compute model features (``core.features``, whose indicator
functions it reuses).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from core.features import atr, price_arrays, rsi, sma, sma_table
from core.jit import pick, serial_twin


def _broadcast_params(*params) -> tuple[bool, list[np.ndarray]]:
    scalar = all(np.ndim(p) == 0 for p in params)
    arrays = np.broadcast_arrays(*(np.atleast_1d(np.asarray(p)) for p in params))
    return scalar, [np.ascontiguousarray(a.ravel()) for a in arrays]


def _indicator_table(values: np.ndarray, compute) -> tuple[np.ndarray, np.ndarray]:
    """Compute an indicator once per distinct parameter value: (table [U, T], row index [P])."""
    unique, index = np.unique(values, return_inverse=True)
    table = np.stack([compute(u) for u in unique])
    return np.ascontiguousarray(table), index.astype(np.int64)


def pair_grid(fast, slow) -> tuple[np.ndarray, np.ndarray]:
    """All (fast, slow) window pairs from two ranges with fast < slow, as two [P] arrays."""
    f, s = np.meshgrid(np.asarray(fast), np.asarray(slow), indexing="ij")
    keep = f < s
    return f[keep].astype(np.int64), s[keep].astype(np.int64)


@njit(cache=True, parallel=True)
def _crossover_targets(table, fast_row, slow_row, cross_events, allow_short, out):
    P, T = out.shape
    short = -1.0 if allow_short else 0.0
    for p in prange(P):
        f = table[fast_row[p]]
        s = table[slow_row[p]]
        pos = 0.0
        for t in range(T):
            if cross_events:
                # backtesting.py's crossover(): strictly below on the previous
                # bar and strictly above on this one. NaN compares False, so
                # nothing fires during warm-up.
                if t > 0:
                    if f[t - 1] < s[t - 1] and f[t] > s[t]:
                        pos = 1.0
                    elif f[t - 1] > s[t - 1] and f[t] < s[t]:
                        pos = short
            else:
                if f[t] > s[t]:
                    pos = 1.0
                elif f[t] < s[t]:
                    pos = short
                else:
                    # Equal averages or warm-up: no view, no position.
                    pos = 0.0
            out[p, t] = pos


_crossover_targets_1 = serial_twin(_crossover_targets)


def sma_crossover(
    bars: Any,
    fast,
    slow,
    *,
    mode: str = "cross",
    sma_method: str = "window",
    allow_short: bool = True,
) -> np.ndarray:
    """Long when the fast SMA is above the slow one, short when below.

    ``mode="cross"`` (default) acts on crossings only, as backtesting.py's
    ``SmaCross`` example does: the position flips to +1 on the bar where fast
    moves from strictly below to strictly above slow, to -1 on the opposite
    crossing, and is held in between; flat until the first crossing. A touch
    (fast == slow on a bar) is not a crossing, also as in backtesting.py.
    One difference from that example: if fast dips below slow through a touch
    and then crosses up again, SmaCross closes and reopens its long (paying
    commission twice); here the target is +1 throughout, so nothing trades.
    ``mode="state"`` holds sign(fast - slow) on every bar from the end of the
    warm-up. ``sma_method`` is passed to :func:`core.features.sma` ("window"
    or backtesting.py's "rolling"). With ``allow_short=False`` the short side
    becomes flat.
    """
    if mode not in ("cross", "state"):
        raise ValueError(f"mode must be 'cross' or 'state', got {mode!r}")
    scalar, (fast_a, slow_a) = _broadcast_params(fast, slow)
    if np.any(fast_a < 1) or np.any(slow_a < 1):
        raise ValueError("SMA windows must be >= 1")
    close = price_arrays(bars, ("close",))["close"]
    windows, rows = np.unique(np.concatenate([fast_a, slow_a]), return_inverse=True)
    table = sma_table(close, windows, sma_method)
    rows = rows.astype(np.int64)
    P = fast_a.shape[0]
    out = np.empty((P, close.shape[0]))
    pick(_crossover_targets, _crossover_targets_1, P)(table, rows[:P], rows[P:], mode == "cross", allow_short, out)
    return out[0] if scalar else out


@njit(cache=True, parallel=True)
def _band_targets(signal, mid_row, width_row, multiplier, mid_table, width_table, allow_short, out):
    """Enter long above mid + k*width, short below mid - k*width; exit when signal crosses mid back."""
    P, T = out.shape
    short = -1.0 if allow_short else 0.0
    for p in prange(P):
        mid = mid_table[mid_row[p]]
        width = width_table[width_row[p]]
        k = multiplier[p]
        pos = 0.0
        for t in range(T):
            x = signal[t]
            m = mid[t]
            w = width[t]
            if m != m or w != w:  # NaN: still warming up, hold (flat)
                out[p, t] = pos
                continue
            if x > m + k * w:
                pos = 1.0
            elif x < m - k * w:
                pos = short
            elif pos > 0 and x < m:
                pos = 0.0
            elif pos < 0 and x > m:
                pos = 0.0
            out[p, t] = pos


_band_targets_1 = serial_twin(_band_targets)


def atr_breakout(
    bars: Any,
    window,
    multiplier,
    atr_window=14,
    *,
    allow_short: bool = True,
) -> np.ndarray:
    """Volatility-channel breakout (a Keltner channel of ATRs around an SMA).

    Goes long when the close breaks above ``SMA(window) + multiplier * ATR(atr_window)``,
    short when it breaks below ``SMA - multiplier * ATR``, and exits to flat
    when the close crosses back through the SMA. A break through the far band
    reverses directly.
    """
    scalar, (window_a, mult_a, atr_a) = _broadcast_params(window, multiplier, atr_window)
    p = price_arrays(bars, ("high", "low", "close"))
    close = p["close"]
    mid_table, mid_rows = _indicator_table(window_a, lambda n: sma(close, int(n)))
    atr_table, atr_rows = _indicator_table(atr_a, lambda n: atr(p["high"], p["low"], close, int(n)))
    out = np.empty((window_a.shape[0], close.shape[0]))
    pick(_band_targets, _band_targets_1, window_a.shape[0])(close, mid_rows, atr_rows, mult_a.astype(np.float64), mid_table, atr_table, allow_short, out)
    return out[0] if scalar else out


@njit(cache=True, parallel=True)
def _reversion_targets(table, row, lower, upper, exit_level, allow_short, out):
    P, T = out.shape
    short = -1.0 if allow_short else 0.0
    for p in prange(P):
        x = table[row[p]]
        pos = 0.0
        for t in range(T):
            v = x[t]
            if v != v:
                out[p, t] = pos
                continue
            if v < lower[p]:
                pos = 1.0
            elif v > upper[p]:
                pos = short
            elif pos > 0 and v >= exit_level[p]:
                pos = 0.0
            elif pos < 0 and v <= exit_level[p]:
                pos = 0.0
            out[p, t] = pos


_reversion_targets_1 = serial_twin(_reversion_targets)


def rsi_reversion(
    bars: Any,
    window=14,
    lower=30.0,
    upper=70.0,
    exit_level=50.0,
    *,
    allow_short: bool = True,
) -> np.ndarray:
    """RSI mean reversion: long when RSI(window) < lower, short when > upper,
    back to flat when RSI returns to ``exit_level``."""
    scalar, (window_a, lower_a, upper_a, exit_a) = _broadcast_params(window, lower, upper, exit_level)
    if np.any(lower_a >= upper_a):
        raise ValueError("lower must be below upper")
    close = price_arrays(bars, ("close",))["close"]
    table, rows = _indicator_table(window_a, lambda n: rsi(close, int(n)))
    out = np.empty((window_a.shape[0], close.shape[0]))
    pick(_reversion_targets, _reversion_targets_1, window_a.shape[0])(
        table, rows, lower_a.astype(np.float64), upper_a.astype(np.float64), exit_a.astype(np.float64),
        allow_short, out,
    )
    return out[0] if scalar else out
