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

**The registry.** A :class:`Strategy` wraps a rule for search: bars and a
parameter table (name -> array ``[P]``) in, targets ``[P, T]`` out, with its
default grid and the rule that masks nonsense sets. The rule strategies here
are registered by name (``get_strategy("sma_crossover")``); a learned model
joins through :func:`model_strategy` and :func:`register_strategy`, or, for
names of the form ``model:NAME@VERSION``, through the ``resolver`` the caller
passes to :func:`get_strategy` (``tune.models.connect_registry`` makes one
over the model registry). There is no global hook: a name resolves the same
way in every caller that passes the same resolver.

This module does not size orders, charge costs or compute P&L (``core.engine``),
it does not compute model features (``core.features``, whose indicator
functions it reuses), and it does not load models or search (``tune``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
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


# -- parameter tables ---------------------------------------------------------------
ParamTable = dict[str, np.ndarray]  # name -> [P] values: P parameter sets as columns


def table_size(table: ParamTable) -> int:
    sizes = {len(v) for v in table.values()}
    if len(sizes) > 1:
        raise ValueError(f"parameter columns have different lengths: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def params_at(table: ParamTable, i: int) -> dict[str, Any]:
    """Parameter set ``i`` as plain Python scalars."""
    return {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in table.items()}


def take(table: ParamTable, index) -> ParamTable:
    return {k: np.asarray(v)[index] for k, v in table.items()}


def filter_table(table: ParamTable, valid, rule: str = "") -> ParamTable:
    """The sets of ``table`` that ``valid`` accepts; a ValueError that states ``rule`` when none is."""
    if valid is None or not table:
        return table
    keep = np.asarray(valid(table), dtype=bool)
    out = {k: v[keep] for k, v in table.items()}
    if table_size(out) == 0:
        raise ValueError("no valid parameter set among those given" + (f" (needs {rule})" if rule else ""))
    return out


def grid_table(grid: Mapping[str, Sequence[Any]], valid=None) -> ParamTable:
    """Every combination of the grid's values (minus invalid ones), as columns."""
    if not grid:
        return {}
    names = list(grid)
    values = [list(np.atleast_1d(grid[k])) for k in names]
    if any(len(v) == 0 for v in values):
        raise ValueError("every parameter needs at least one value")
    rows = list(product(*values))
    return filter_table({k: np.array([r[i] for r in rows]) for i, k in enumerate(names)}, valid)


# -- strategies for search, and their registry ---------------------------------------
@dataclass(frozen=True)
class Strategy:
    """A strategy Tune can search: bars and a parameter table in, targets ``[P, T]`` out.

    ``run(bars, table)`` gets one symbol's bars (a frame) and a table of ``P``
    parameter sets (name -> array ``[P]``) and returns ``[P, T]`` targets in
    [-1, 1], target ``t`` decided from bars ``<= t``. ``grid`` is the default
    search space (name -> values; the cartesian product is searched);
    ``valid`` masks combinations that make no sense (a fast SMA not shorter
    than the slow one).
    """

    name: str
    run: Callable[[pd.DataFrame, ParamTable], np.ndarray]
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    valid: Callable[[ParamTable], np.ndarray] | None = None
    description: str = ""
    rule: str = ""  # what ``valid`` asks, in words, for error messages
    whole: tuple[str, ...] = ()  # parameters that take whole numbers only (windows, in bars)
    # A learned model's training bars, symbol -> (first ts, last ts): a backtest over them is in-sample.
    trained_on: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def check(self, table: ParamTable) -> ParamTable:
        """The sets of ``table`` that ``valid`` accepts; a ValueError that states the rule when none is."""
        return filter_table(table, self.valid, self.rule)

    def targets(self, bars: pd.DataFrame, table: ParamTable) -> np.ndarray:
        n = table_size(table)
        out = np.asarray(self.run(bars, table), dtype=np.float64)
        if out.ndim == 1:
            out = out[None, :]
        if out.shape != (n, len(bars)):
            raise ValueError(f"strategy {self.name} returned targets {out.shape}, expected ({n}, {len(bars)})")
        return out


def model_strategy(name: str, predict: Callable[..., Any], grid: Mapping[str, Sequence[Any]] | None = None,
                   description: str = "", trained_on: Mapping[str, tuple[str, str]] | None = None) -> Strategy:
    """A learned model or policy as a strategy.

    ``predict(bars, **params)`` returns that model's targets ``[T]`` in
    [-1, 1] for one symbol's bars, target ``t`` from bars ``<= t`` (an ONNX
    member or a CVaR-PPO policy wrapped by the registry does this with
    ``core.features.compute_features``). ``grid`` holds the knobs worth
    searching (a position scale, a confidence threshold, a model version);
    without one there is a single candidate and walk-forward only checks it
    out of sample.
    """
    grid = dict(grid or {})

    def run(bars: pd.DataFrame, table: ParamTable) -> np.ndarray:
        n = table_size(table)
        return np.stack([np.asarray(predict(bars, **params_at(table, i)), dtype=np.float64) for i in range(n)])

    return Strategy(name=name, run=run, grid=grid, description=description or f"model {name}",
                    trained_on=dict(trained_on or {}))


def _sma(bars, p):
    return sma_crossover(bars, p["fast"], p["slow"])


def _sma_valid(p):
    return p["fast"] < p["slow"]


def _atr(bars, p):
    return atr_breakout(bars, p["window"], p["multiplier"], p["atr_window"])


def _rsi(bars, p):
    return rsi_reversion(bars, p["window"], p["lower"], p["upper"], p["exit_level"])


def _rsi_valid(p):
    return (p["lower"] < p["exit_level"]) & (p["exit_level"] < p["upper"])


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Make ``strategy`` available by name (to ``get_strategy`` and the CLI)."""
    _STRATEGIES[strategy.name] = strategy
    return strategy


def strategy_names() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str, resolver: Callable[[str], Strategy] | None = None) -> Strategy:
    """The strategy registered as ``name``; ``model:NAME@VERSION`` through ``resolver`` (the caller's
    model registry, e.g. ``tune.models.connect_registry(settings)``), which nothing here remembers."""
    if name in _STRATEGIES:
        return _STRATEGIES[name]
    if name.startswith("model:"):
        if resolver is None:
            raise KeyError(f"strategy {name!r}: no model registry was given to resolve model strategies "
                           "(pass resolver=, e.g. tune.models.connect_registry(settings))")
        return resolver(name)
    raise KeyError(f"unknown strategy {name!r}; choose one of {', '.join(strategy_names())} or model:NAME@VERSION")


register_strategy(Strategy(
    "sma_crossover", _sma,
    grid={"fast": list(range(5, 55, 5)), "slow": list(range(20, 220, 20))}, valid=_sma_valid,
    description="long when SMA(fast) crosses above SMA(slow), short on the opposite crossing", rule="fast < slow",
    whole=("fast", "slow")))
register_strategy(Strategy(
    "atr_breakout", _atr,
    grid={"window": [10, 20, 50], "multiplier": [1.0, 1.5, 2.0, 3.0], "atr_window": [14]},
    description="Keltner-channel breakout; exit when the close crosses back through the SMA",
    whole=("window", "atr_window")))
register_strategy(Strategy(
    "rsi_reversion", _rsi,
    grid={"window": [7, 14, 21], "lower": [20.0, 30.0], "upper": [70.0, 80.0], "exit_level": [50.0]},
    valid=_rsi_valid, description="long below RSI lower, short above upper, flat at exit_level",
    rule="lower < exit_level < upper", whole=("window",)))
