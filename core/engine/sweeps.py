"""Parameter sweeps in one fused pass: ``backtest_sma_grid``, bars and windows in, metrics out.

For a grid of SMA crossovers the target matrix ``[P, T]`` is never built:
each distinct window's SMA is computed once, each set's target changes are
read off its two SMA rows (``core.strategies.sma_cross_changes``, the rule
``sma_crossover`` uses) and fed straight to ``kernels._simulate``. The result
equals ``backtest_batch(bars, sma_crossover(...))`` (tested).

Not here: the fill rules (``kernels``), general targets (``batch``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from core import metrics as _metrics
from core.engine.batch import BatchResult, _bar_times, _Outputs
from core.engine.kernels import (
    _all_positive_finite,
    _check_costs,
    _metrics_of,
    _n_chunks,
    _simulate,
    metric_level,
)
from core.features import price_arrays
from core.metric_kernels import scratch_size
from core.strategies import cross_scratch_size, sma_cross_changes, sma_grid_table

@njit(cache=True, parallel=True, error_model="numpy")
def _run_sma_grid(open_, close, table, fast_row, slow_row, sets, cross_events, short, fill_on_close, commission,
                  slippage, whole_units, cash, close_at_end, keep_curves, equity_out, units_out, trades,
                  trade_offsets, n_trades, compute_metrics, periods_per_year, tail, metrics_out, n_chunks):
    """``_run_batch`` for SMA crossover targets, read from the SMA table instead of a ``[P, T]`` target matrix.

    Runs the parameter sets ``sets`` (indices into ``fast_row``/``slow_row``);
    with ``record_trades=False`` no rows are reserved in ``trades`` and none
    are written (the metrics take the closed trades from ``_simulate``).
    """
    n_sets = sets.shape[0]
    T = close.shape[0]
    per = -(-n_sets // n_chunks)
    for c in prange(n_chunks):
        ev_bar = np.empty(T, dtype=np.int64)
        ev_target = np.empty(T)
        scratch_m = np.empty(scratch_size(T) if compute_metrics else 0)
        cell = np.empty(1, dtype=np.int64)
        scratch = np.empty(0 if keep_curves else T)
        no_units = np.empty(0)
        closed_stats = np.empty(4)
        masks = np.empty(cross_scratch_size(T), dtype=np.uint64)
        for i in range(c * per, min(n_sets, (c + 1) * per)):
            p = sets[i]
            n_ev = sma_cross_changes(table[fast_row[p]], table[slow_row[p]], cross_events, short, ev_bar, ev_target,
                                     masks)
            mine = trades[trade_offsets[p]:trade_offsets[p + 1]]
            equity = equity_out[p] if keep_curves else scratch
            units = units_out[p] if keep_curves else no_units
            n, held = _simulate(open_, close, ev_bar, ev_target, n_ev, fill_on_close, commission, slippage,
                                whole_units, cash, close_at_end, equity, units, mine, closed_stats)
            n_trades[p] = n
            if compute_metrics:
                _metrics_of(equity, cash, held, closed_stats, periods_per_year, tail, scratch_m, cell, metrics_out[p],
                           compute_metrics)


@njit(cache=True, parallel=True)
def _count_sma_changes(table, fast_row, slow_row, cross_events, short, changes, n_chunks):
    """How often each set's crossover target changes: the bound that sizes its trade table."""
    P = changes.shape[0]
    T = table.shape[1]
    per = -(-P // n_chunks)
    for c in prange(n_chunks):
        ev_bar = np.empty(T, dtype=np.int64)
        ev_target = np.empty(T)
        masks = np.empty(cross_scratch_size(T), dtype=np.uint64)
        for p in range(c * per, min(P, (c + 1) * per)):
            changes[p] = sma_cross_changes(table[fast_row[p]], table[slow_row[p]], cross_events, short, ev_bar,
                                           ev_target, masks)


def backtest_sma_grid(
    bars: Any,
    fast,
    slow,
    *,
    mode: str = "cross",
    sma_method: str = "window",
    allow_short: bool = True,
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
) -> BatchResult:
    """A grid of SMA crossovers in one compiled pass, from bars and windows to metrics.

    The same result as ``backtest_batch(bars, sma_crossover(bars, fast, slow,
    mode=mode, sma_method=sma_method, allow_short=allow_short), ...)`` (the
    tests hold the two equal), without its ``[P, T]`` target matrix: each
    distinct window's SMA is computed once, and each parameter set's target
    changes are read off its two SMA rows (``core.strategies.sma_cross_changes``,
    the rule ``sma_crossover`` uses) and fed straight to the simulation,
    which computes the metrics while the curve is in cache. ``fast`` and
    ``slow`` broadcast together to P sets (``core.strategies.pair_grid``
    makes a grid). Keyword arguments are ``run_batch``'s.
    """
    _check_costs(cash, commission, slippage, fill)
    level = metric_level(compute_metrics)
    p = price_arrays(bars, ("open", "close"))
    open_, close = (np.require(p[k], requirements=("C", "W")) for k in ("open", "close"))
    T = close.shape[0]
    if T == 0:
        raise ValueError("no bars")
    if not (_all_positive_finite(close) and _all_positive_finite(open_)):
        raise ValueError("open and close prices must be finite and positive")
    _, table, fast_row, slow_row = sma_grid_table(close, fast, slow, mode, sma_method)
    P = fast_row.shape[0]
    cross_events = mode == "cross"
    short = -1.0 if allow_short else 0.0
    chunks = _n_chunks(P)
    if record_trades:
        changes = np.empty(P, dtype=np.int64)
        _count_sma_changes(table, fast_row, slow_row, cross_events, short, changes, chunks)
        trade_offsets = np.concatenate(([0], np.cumsum(changes + 1))).astype(np.int64)
    else:
        trade_offsets = np.zeros(P + 1, dtype=np.int64)
    o = _Outputs.allocate(P, T, trade_offsets, keep_curves, level, alpha)
    _run_sma_grid(open_, close, table, fast_row, slow_row, np.arange(P), cross_events, short, fill == "close",
                  float(commission), float(slippage), bool(whole_units), float(cash), bool(close_at_end),
                  bool(keep_curves), o.equity, o.units, o.trades, o.trade_offsets, o.n_trades, level,
                  float(periods_per_year), o.tail, o.table, chunks)
    return o.result(cash, keep_curves, level, _bar_times(bars))
