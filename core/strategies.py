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

from core.bitmask import trailing_zeros
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


def sma_grid_table(close: np.ndarray, fast, slow, mode: str = "cross", sma_method: str = "window"):
    """The SMA crossover's inputs for P (fast, slow) sets: (scalar, table [W, T], fast rows [P], slow rows [P]).

    Each distinct window's SMA is computed once; ``fast`` and ``slow``
    broadcast together, and ``scalar`` says whether both were single windows.
    """
    if mode not in ("cross", "state"):
        raise ValueError(f"mode must be 'cross' or 'state', got {mode!r}")
    scalar, (fast_a, slow_a) = _broadcast_params(fast, slow)
    if np.any(fast_a < 1) or np.any(slow_a < 1):
        raise ValueError("SMA windows must be >= 1")
    P = fast_a.shape[0]
    fast_a, slow_a = fast_a.astype(np.int64), slow_a.astype(np.int64)
    longest = int(max(fast_a.max(initial=0), slow_a.max(initial=0)))
    if longest <= 1_000_000:
        # Windows are small integers: a presence table maps them to rows without sorting the grid.
        present = np.zeros(longest + 1, dtype=bool)
        present[fast_a] = True
        present[slow_a] = True
        windows = np.flatnonzero(present)
        row_of = np.cumsum(present) - 1
        fast_row, slow_row = row_of[fast_a], row_of[slow_a]
    else:
        windows, rows = np.unique(np.concatenate([fast_a, slow_a]), return_inverse=True)
        fast_row, slow_row = rows[:P].astype(np.int64), rows[P:].astype(np.int64)
    table = np.require(sma_table(close, windows, sma_method), requirements=("C", "W"))
    return scalar, table, np.ascontiguousarray(fast_row), np.ascontiguousarray(slow_row)


def pair_grid(fast, slow) -> tuple[np.ndarray, np.ndarray]:
    """All (fast, slow) window pairs from two ranges with fast < slow, as two [P] arrays."""
    f, s = np.meshgrid(np.asarray(fast), np.asarray(slow), indexing="ij")
    keep = f < s
    return f[keep].astype(np.int64), s[keep].astype(np.int64)


@njit(cache=True, error_model="numpy")
def _sign_masks(fast, slow, above, below):
    """Bit masks (``core.bitmask``) of the bars where fast > slow and where fast < slow.

    Neither bit is set where they are equal or NaN (the warm-up). Indices
    are unsigned: the compiler then knows they are not negative (numba
    wraps negative indices, which would turn the loads into gathers)
    without slicing, whose reference counting costs more than these loops.
    """
    T = np.uint64(fast.shape[0])
    for i in range(above.shape[0]):
        start = np.uint64(64) * np.uint64(i)
        a = np.uint64(0)
        b = np.uint64(0)
        if start + np.uint64(64) <= T:  # a whole word: a fixed trip count the compiler unrolls
            for j in range(64):
                t = start + np.uint64(j)
                a |= np.uint64(fast[t] > slow[t]) << np.uint64(j)
                b |= np.uint64(fast[t] < slow[t]) << np.uint64(j)
        else:
            for t in range(start, T):
                a |= np.uint64(fast[t] > slow[t]) << (t - start)
                b |= np.uint64(fast[t] < slow[t]) << (t - start)
        above[i] = a
        below[i] = b


@njit(cache=True)
def cross_scratch_size(n):
    """Length of the uint64 scratch ``sma_cross_changes`` needs for n bars."""
    return 2 * ((n + 63) // 64)


@njit(cache=True)
def sma_cross_changes(fast, slow, cross_events, short, ev_bar, ev_target, masks):
    """The crossover rule as the bars where its target changes: ``ev_bar[:n]``, ``ev_target[:n]``; returns n.

    The one implementation of the rule (see ``sma_crossover``): the target
    series it describes is 0 until ``ev_bar[0]``, then ``ev_target[k]``
    from ``ev_bar[k]`` on. ``sma_crossover`` spells it out bar by bar; the
    engine's grid path (``core.engine.backtest_sma_grid``) feeds the changes
    straight to its simulation. ``masks`` is uint64 scratch of
    ``cross_scratch_size(len(fast))``.

    Only a bar where the sign of fast - slow changes can move the target.
    The signs of all bars go into bit masks in one vectorised pass; shifted
    by one bar they give the previous bar's, so the crossings of 64 bars
    are a few word operations, and the rule runs on those bars alone.
    """
    T = fast.shape[0]
    n_words = (T + 63) // 64
    above = masks[:n_words]
    below = masks[n_words:2 * n_words]
    _sign_masks(fast, slow, above, below)
    one = np.uint64(1)
    above_carry = np.uint64(0)  # the previous word's last bar (before bar 0: no view)
    below_carry = np.uint64(0)
    n = 0
    held = 0.0  # the target as of the last change
    for i in range(n_words):
        a = above[i]
        b = below[i]
        a_before = (a << one) | above_carry
        b_before = (b << one) | below_carry
        above_carry = a >> np.uint64(63)
        below_carry = b >> np.uint64(63)
        if cross_events:
            # backtesting.py's crossover(): strictly below on the previous bar
            # and strictly above on this one (NaN compares False, so nothing
            # fires in the warm-up); between crossings the position holds.
            up = b_before & a
            bars = up | (a_before & b)
        else:
            # Any change of sign, including to equal (no view, no position).
            up = a
            bars = (a ^ a_before) | (b ^ b_before)
            if T - 64 * i < 64:
                bars &= (one << np.uint64(T - 64 * i)) - one  # no bar past the end
        while bars:
            j = trailing_zeros(bars)
            bit = one << j
            if up & bit:
                pos = 1.0
            elif b & bit:
                pos = short
            else:
                pos = 0.0
            if pos != held:
                ev_bar[n] = 64 * i + np.int64(j)
                ev_target[n] = pos
                n += 1
                held = pos
            bars &= bars - one
    return n


@njit(cache=True, parallel=True)
def _crossover_targets(table, fast_row, slow_row, cross_events, allow_short, out):
    P, T = out.shape
    short = -1.0 if allow_short else 0.0
    for p in prange(P):
        ev_bar = np.empty(T, dtype=np.int64)
        ev_target = np.empty(T)
        masks = np.empty(cross_scratch_size(T), dtype=np.uint64)
        n = sma_cross_changes(table[fast_row[p]], table[slow_row[p]], cross_events, short, ev_bar, ev_target, masks)
        row = out[p]
        start = 0
        pos = 0.0
        for k in range(n):
            row[start:ev_bar[k]] = pos
            start = ev_bar[k]
            pos = ev_target[k]
        row[start:] = pos


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
    close = price_arrays(bars, ("close",))["close"]
    scalar, table, fast_row, slow_row = sma_grid_table(close, fast, slow, mode, sma_method)
    P = fast_row.shape[0]
    out = np.empty((P, close.shape[0]))
    pick(_crossover_targets, _crossover_targets_1, P)(table, fast_row, slow_row, mode == "cross", allow_short, out)
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
