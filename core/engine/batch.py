"""Backtests of P parameter sets at once: ``run_batch`` on arrays, ``backtest_batch`` and ``backtest`` on bars.

Each parameter set runs ``kernels._simulate`` in a compiled, parallel loop
(``_run_batch``), its metrics computed while its curve is in cache; a run
that wants neither metrics nor trades (Monte Carlo) takes ``_run_paths``,
which finds orders a 64-bar word at a time and keeps no trade book (the same
equity, units and trade counts, tested). Results are ``BatchResult`` and
``BacktestResult``.

Not here: the fill rules (``kernels``), the SMA grid (``sweeps``), price
paths (``paths``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numba import njit, prange

from core import metrics as _metrics
from core.bitmask import trailing_zeros
from core.engine.kernels import (
    COMMISSION,
    ENTRY_BAR,
    ENTRY_PRICE,
    EXIT_BAR,
    EXIT_PRICE,
    IS_OPEN,
    METRICS_ALL,
    N_TRADE_FIELDS,
    PNL,
    SIZE,
    _all_positive_finite,
    _change_masks,
    _check_costs,
    _check_targets,
    _fill_span,
    _fill_terms,
    _mark_to_market,
    _metrics_of,
    _n_chunks,
    _path_end,
    _rebalance_cash,
    _simulate,
    _target_changes,
    metric_level,
)
from core.features import price_arrays
from core.metric_kernels import scratch_size

@dataclass
class BacktestResult:
    """One parameter set's backtest.

    ``equity``, ``returns`` and ``units`` have one entry per bar (``returns[0]``
    is measured from the starting cash); ``trades`` has one row per trade,
    the open one last with ``is_open`` set; ``metrics`` maps names from
    ``core.metrics.summary`` to floats.
    """

    equity: np.ndarray
    returns: np.ndarray
    units: np.ndarray
    trades: pd.DataFrame
    metrics: dict[str, float]
    times: np.ndarray | None = None


@dataclass
class BatchResult:
    """Backtests of P parameter sets over the same bars (or P price paths).

    Arrays are ``[P, T]`` (``None`` when run with ``keep_curves=False``);
    ``trade_array`` is ``[sum of K_p, N_TRADE_FIELDS]``: set ``p`` owns rows
    ``trade_offsets[p]`` to ``trade_offsets[p + 1]``, of which the first
    ``n_trades[p]`` are filled; ``metrics`` maps names to ``[P]``.
    """

    equity: np.ndarray | None
    units: np.ndarray | None
    trade_array: np.ndarray
    trade_offsets: np.ndarray
    n_trades: np.ndarray
    cash: float
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    times: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_trades.shape[0]

    @property
    def returns(self) -> np.ndarray:
        return _metrics.returns_from_equity(self.equity, self.cash)

    def closed_trade_pnl(self) -> np.ndarray:
        """[P, K] P&L of closed trades, NaN-padded (what win rate and profit factor count)."""
        counts = np.minimum(self.n_trades, np.diff(self.trade_offsets))
        pnl = np.full((len(self), int(counts.max(initial=0))), np.nan)
        for p, n in enumerate(counts):
            rows = self.trade_array[self.trade_offsets[p]: self.trade_offsets[p] + n]
            pnl[p, :n] = np.where(rows[:, IS_OPEN] == 0, rows[:, PNL], np.nan)
        return pnl

    def trades(self, p: int) -> pd.DataFrame:
        """Trade list of parameter set ``p``: entry/exit bar and time, prices, size, P&L, commission."""
        start = self.trade_offsets[p]
        if self.n_trades[p] > self.trade_offsets[p + 1] - start:
            raise ValueError("trades were not recorded (record_trades=False)")
        rows = self.trade_array[start: start + self.n_trades[p]]
        entry_bar = rows[:, ENTRY_BAR].astype(np.int64)
        exit_bar = rows[:, EXIT_BAR].astype(np.int64)
        frame = pd.DataFrame(
            {
                "entry_bar": entry_bar,
                "exit_bar": exit_bar,
                "entry_price": rows[:, ENTRY_PRICE],
                "exit_price": rows[:, EXIT_PRICE],
                "size": rows[:, SIZE],
                "pnl": rows[:, PNL],
                "commission": rows[:, COMMISSION],
                "is_open": rows[:, IS_OPEN].astype(bool),
            }
        )
        if self.times is not None:
            times = pd.Series(pd.to_datetime(self.times))
            frame.insert(2, "entry_time", times.iloc[entry_bar].to_numpy())
            exit_time = times.iloc[np.where(exit_bar >= 0, exit_bar, 0)].to_numpy().copy()
            exit_time[exit_bar < 0] = np.datetime64("NaT")
            frame.insert(3, "exit_time", exit_time)
        return frame

    def __getitem__(self, p: int) -> BacktestResult:
        if self.equity is None:
            raise ValueError("curves were not kept (keep_curves=False); rerun this parameter set with backtest()")
        return BacktestResult(
            equity=self.equity[p],
            returns=_metrics.returns_from_equity(self.equity[p], self.cash),
            units=self.units[p],
            trades=self.trades(p),
            metrics={k: float(v[p]) for k, v in self.metrics.items()},
            times=self.times,
        )


@njit(cache=True, parallel=True, error_model="numpy")
def _run_batch(open_, close, targets, fill_on_close, commission, slippage, whole_units, cash, close_at_end,
               keep_curves, equity_out, units_out, trades, trade_offsets, n_trades,
               compute_metrics, periods_per_year, tail, metrics_out, n_chunks):
    P, T = targets.shape
    last_row = close.shape[0] - 1  # 0 when every parameter set shares one market
    per = -(-P // n_chunks)
    for c in prange(n_chunks):
        ev_bar = np.empty(T, dtype=np.int64)
        ev_target = np.empty(T)
        scratch_m = np.empty(scratch_size(T) if compute_metrics else 0)
        cell = np.empty(1, dtype=np.int64)
        closed_stats = np.empty(4)
        # A sweep that wants only metrics keeps one curve at a time, in cache.
        scratch = np.empty(0 if keep_curves else T)
        no_units = np.empty(0)
        for p in range(c * per, min(P, (c + 1) * per)):
            row = min(np.int64(p), last_row)
            equity = equity_out[p] if keep_curves else scratch
            units = units_out[p] if keep_curves else no_units
            mine = trades[trade_offsets[p]:trade_offsets[p + 1]]
            n_ev = _target_changes(targets[p], ev_bar, ev_target)
            n, held = _simulate(open_[row], close[row], ev_bar, ev_target, n_ev, fill_on_close, commission,
                                slippage, whole_units, cash, close_at_end, equity, units, mine, closed_stats)
            n_trades[p] = n
            if compute_metrics and n >= 0:  # n < 0: a bad target, reported by the caller
                _metrics_of(equity, cash, held, closed_stats, periods_per_year, tail, scratch_m, cell, metrics_out[p],
                           compute_metrics)


@njit(cache=True, parallel=True, error_model="numpy")
def _run_paths(open_, close, targets, fill_on_close, commission, slippage, whole_units, cash0, close_at_end,
               keep_curves, equity_out, units_out, n_trades, n_chunks):
    """``_run_batch`` without trade lists or metrics, for Monte Carlo.

    A Monte Carlo rule may trade every few bars, so finding its orders must
    cost little per bar: the changes of target go into bit masks in one
    vectorised pass and are visited a set bit at a time; between two
    orders equity is marked in one vectorised pass (ruin, equity at or
    below zero, is looked for only where it happened), and an order costs
    its fills (``_rebalance_cash``: ``_rebalance`` with no trade table).
    Equity, units and trade counts equal ``_run_batch``'s (tested).
    """
    P, T = targets.shape
    last_row = close.shape[0] - 1
    n_words = (T + 63) // 64
    lag = 0 if fill_on_close else 1  # an order fills on its own bar's close, or at the next open
    per = -(-P // n_chunks)
    for c in prange(n_chunks):
        no_curve = np.empty(0)
        marks = np.empty(T)  # one path's equity when the curves are not kept
        masks = np.empty(n_words, dtype=np.uint64)
        no_trades = np.empty((0, N_TRADE_FIELDS))
        for p in range(c * per, min(P, (c + 1) * per)):
            row = min(np.int64(p), last_row)
            closes = close[row]
            opens = open_[row]
            wanted = targets[p]
            equity = equity_out[p] if keep_curves else marks
            held = units_out[p] if keep_curves else no_curve
            _change_masks(wanted, masks)
            cash = cash0
            units = 0.0
            trades = 0
            start = 0
            trading = True
            for i in range(n_words + 1):
                word = masks[i] if i < n_words else np.uint64(1)  # past the last word: the end, as an order at T
                while trading and word:
                    stop = T if i == n_words else min(T, 64 * i + np.int64(trailing_zeros(word)) + lag)
                    word &= word - np.uint64(1)
                    # Mark [start, stop) in one vectorised pass; ruin (equity at or
                    # below zero) is rare, so look for where only if it happened.
                    broke = _mark_to_market(closes, cash, units, start, stop, equity)
                    if keep_curves:
                        _fill_span(held, units, start, stop)
                    if broke:
                        t = start
                        while equity[t] > 0.0:
                            t += 1
                        # Out of money: liquidate at this close and stop.
                        if units != 0.0:
                            fill_price, qty, fee = _fill_terms(-units, closes[t], commission, slippage)
                            cash -= -units * fill_price + fee
                            trades += 1
                        units = 0.0
                        if keep_curves:
                            equity[t:] = 0.0
                            held[t:] = 0.0
                        trading = False
                    start = stop
                    if not trading or stop == T:
                        trading = False
                        break
                    target = wanted[stop - lag]
                    if not (-1.0 <= target <= 1.0):  # NaN fails too
                        trades = -1
                        trading = False
                        break
                    price = closes[stop] if fill_on_close else opens[stop]
                    cash, units, closed = _rebalance_cash(cash, units, target, price, commission, slippage,
                                                          whole_units, no_trades)
                    trades += closed
                if not trading:
                    break
            n_trades[p] = _path_end(closes, commission, slippage, close_at_end, keep_curves, equity, held, cash,
                                    units, trades)


def _bar_times(bars: Any) -> np.ndarray | None:
    if isinstance(bars, pd.DataFrame):
        if "ts" in bars.columns:
            return bars["ts"].to_numpy()
        if isinstance(bars.index, pd.DatetimeIndex):
            return bars.index.to_numpy()
    return None


@dataclass
class _Outputs:
    """What the compiled loops write, allocated once for P sets over T bars."""

    equity: np.ndarray
    units: np.ndarray
    trades: np.ndarray
    trade_offsets: np.ndarray
    n_trades: np.ndarray
    table: np.ndarray
    tail: np.ndarray

    @classmethod
    def allocate(cls, P: int, T: int, trade_offsets: np.ndarray, keep_curves: bool, level: int,
                 alpha: float) -> "_Outputs":
        curve_shape = (P, T) if keep_curves else (0, 0)
        return cls(equity=np.empty(curve_shape), units=np.empty(curve_shape),
                   trades=np.empty((int(trade_offsets[-1]), N_TRADE_FIELDS)), trade_offsets=trade_offsets,
                   n_trades=np.zeros(P, dtype=np.int64),
                   table=np.empty((P, len(_metrics.SUMMARY_NAMES)) if level else (0, 0)),
                   tail=_metrics.tail_weights(T, alpha) if level else np.zeros(6))

    def result(self, cash: float, keep_curves: bool, level: int, times: np.ndarray | None) -> BatchResult:
        names = _metrics.SUMMARY_NAMES if level >= METRICS_ALL else _metrics.MOMENT_NAMES if level else ()
        metrics = {name: self.table[:, i] for i, name in enumerate(_metrics.SUMMARY_NAMES) if name in names}
        return BatchResult(equity=self.equity if keep_curves else None, units=self.units if keep_curves else None,
                           trade_array=self.trades, trade_offsets=self.trade_offsets, n_trades=self.n_trades,
                           cash=float(cash), metrics=metrics, times=times)


def run_batch(
    open_: np.ndarray,
    close: np.ndarray,
    targets: np.ndarray,
    *,
    cash: float = 10_000.0,
    commission: float = 0.0,
    slippage: float = 0.0,
    fill: str = "open",
    whole_units: bool = True,
    close_at_end: bool = False,
    compute_metrics: bool | str = True,
    keep_curves: bool = True,
    record_trades: bool = True,
    periods_per_year: float = _metrics.TRADING_DAYS_PER_YEAR,
    alpha: float = 0.05,
    times: np.ndarray | None = None,
) -> BatchResult:
    """The batched engine on raw arrays.

    ``open_`` and ``close`` are ``[T]`` (one market shared by every parameter
    set) or ``[P, T]`` (one price path per row, for Monte Carlo); ``targets``
    is ``[P, T]``. See the module docstring for the fill rules.

    Metrics (``core.metrics.summary``'s table, VaR/CVaR at ``alpha``) are
    computed inside the compiled loop; ``compute_metrics="moments"`` computes
    only ``core.metrics.MOMENT_NAMES`` (see ``metric_level``).
    ``keep_curves=False`` drops the ``[P, T]`` equity and unit curves, for
    sweeps that only rank parameter sets: it saves the memory traffic, which
    costs more than the simulation.
    ``record_trades=False`` skips the trade list (``n_trades`` still counts
    trades, the open one included), for sweeps and Monte Carlo runs that
    want only outcomes; the metrics of closed trades (``n_trades``,
    ``win_rate``, ``profit_factor``) are computed either way.
    """
    _check_costs(cash, commission, slippage, fill)
    # Writable C-contiguous float64, so numba compiles one signature (pandas
    # hands out read-only views, a different type to numba).
    targets, close, open_ = (
        np.require(np.atleast_2d(np.asarray(a, dtype=np.float64)), requirements=("C", "W"))
        for a in (targets, close, open_)
    )
    P, T = targets.shape
    if close.shape != open_.shape or close.shape[1] != T or close.shape[0] not in (1, P):
        raise ValueError(f"prices {close.shape} do not match targets {targets.shape}")
    if not (_all_positive_finite(close) and (open_ is close or _all_positive_finite(open_))):
        raise ValueError("open and close prices must be finite and positive")
    if record_trades:
        # Each change of target opens at most one trade, so this bounds the trade list.
        changes = _check_targets(targets)
    else:
        # The compiled loop checks every target it acts on; next-open fills
        # never act on the last bar's, so check that one here.
        _check_targets(np.ascontiguousarray(targets[:, -1:]))
        changes = np.zeros(P, dtype=np.int64)
    # One flat table, each set getting as many rows as it can possibly fill:
    # sized per set, it is a few MB where a [P, max K] block would be tens.
    # Rows past n_trades[p] are never read, so it need not be zeroed.
    room = changes + 1 if record_trades else changes
    level = metric_level(compute_metrics)
    o = _Outputs.allocate(P, T, np.concatenate(([0], np.cumsum(room))).astype(np.int64), keep_curves,
                          level, alpha)
    if level or record_trades:
        _run_batch(open_, close, targets, fill == "close", float(commission), float(slippage), bool(whole_units),
                   float(cash), bool(close_at_end), bool(keep_curves), o.equity, o.units, o.trades, o.trade_offsets,
                   o.n_trades, level, float(periods_per_year), o.tail, o.table, _n_chunks(P))
    else:
        # Monte Carlo: outcomes only.
        _run_paths(open_, close, targets, fill == "close", float(commission), float(slippage), bool(whole_units),
                   float(cash), bool(close_at_end), bool(keep_curves), o.equity, o.units, o.n_trades, _n_chunks(P))
    if np.any(o.n_trades < 0):
        _check_targets(targets)  # raises, naming the problem
    return o.result(cash, keep_curves, level, times)


def backtest_batch(bars: Any, targets: np.ndarray, **kwargs) -> BatchResult:
    """Backtest P target-position series ``[P, T]`` on one symbol's bars at once.

    Keyword arguments are those of :func:`run_batch` (cash, commission,
    slippage, fill, whole_units, close_at_end, ...).
    """
    p = price_arrays(bars, ("open", "close"))
    return run_batch(p["open"], p["close"], targets, times=_bar_times(bars), **kwargs)


def backtest(bars: Any, targets: np.ndarray, **kwargs) -> BacktestResult:
    """Backtest one target-position series ``[T]`` on one symbol's bars."""
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim != 1:
        raise ValueError("backtest() takes one series of targets [T]; use backtest_batch for [P, T]")
    return backtest_batch(bars, targets[None, :], **kwargs)[0]
