"""The backtest engine: target positions in, fills, equity, trades and metrics out.

Two verbs::

    from core.engine import backtest, backtest_batch
    result = backtest(bars, targets, cash=10_000, commission=0.001)
    batch = backtest_batch(bars, targets_for_many_parameter_sets)   # [P, T]

and, for a parameter sweep of the SMA crossover, one fused call::

    grid = backtest_sma_grid(bars, *pair_grid(range(2, 101), range(3, 251)), keep_curves=False)

A *target* is the fraction of equity to hold after bar ``t``'s close, in
[-1, 1], decided from bars ``<= t`` (what ``core.strategies`` and the ensemble
produce). The rules, which the tests pin down to the cent:

- **When.** A target that differs from the last one acted on becomes a market
  order. It fills at the *next* bar's open (``fill="open"``, default) or at
  this bar's close (``fill="close"``). With next-open fills the last bar's
  order is never filled. A constant target holds a constant number of units:
  nothing is traded just because equity drifted.
- **Price.** Buys fill at ``price * (1 + slippage)``, sells at
  ``price * (1 - slippage)``. Commission is ``commission`` times the traded
  value at the fill price, charged on entry and on exit.
- **Size.** A change of side (or to flat) first closes the whole position;
  then the new position gets ``|target| * equity / (fill price * (1 + commission))``
  units, equity marked at the unadjusted price, scaled by ``1 - 2**-52`` so
  rounding never buys more than the cash allows (backtesting.py's rule) and
  floored to whole units unless ``whole_units=False``. A same-side change of
  size trades only the difference, and only if the position lies outside
  the sizes computed at the buying and at the selling price (with slippage
  the two differ; inside that band it is already on target).
- **Marks.** Equity after bar ``t`` is cash plus units times ``close[t]``.
  If it reaches zero or below, the position is closed at that close and the
  account stops trading (equity 0 from then on).
- **End.** The position still open after the last bar is reported as an open
  trade marked at the last close, unless ``close_at_end=True``, which closes
  it at the last close, with costs.
- **Trades.** A trade runs from the fill that opens a position to the fill
  that flattens or reverses it. Entry and exit prices are the volume-weighted
  fill prices of its increases and decreases, ``size`` is the total units
  bought (negative: sold short) into it, and its P&L, net of both sides'
  commission, is ``sign * (exit value - entry value) - commission``.

Fills use only ``open`` and ``close``: there are no stop or limit orders, so
``high`` and ``low`` are not needed. The inner loop is compiled with numba
(``cache=True``) and runs parameter sets in parallel. It is driven by the
bars where a target changes: between two orders equity is one vectorised
loop, and the order logic runs only where there is an order. Each set's
metrics (``core.metrics.summary_core``) are computed right after its
simulation, while its curve is still in cache. ``backtest_sma_grid`` runs a
grid of SMA crossovers from bars and windows, feeding the crossover's
change bars straight to the simulation (no ``[P, T]`` target matrix), with
the same results as ``backtest_batch(bars, sma_crossover(...))``.
``simulate_paths`` runs Monte Carlo price paths through a kernel that
keeps no trade list (the same fills and equity as the general loop), and
``simulate_paths_torch`` runs the same rules in torch for large batches on a
GPU (tested equal to the compiled loop). tests/test_engine_fast_paths.py
holds all of these to the rules walked bar by bar in plain Python.

With its defaults the engine reproduces backtesting.py (0.6) running an
always-in-the-market strategy with ``buy()``/``sell()`` after
``position.close()``: the same fills, sizes, commissions and equity, to
1e-6 (tests/test_engine_peer.py). backtesting.py's ``finalize_trades=True``
closes the last trade at the last bar's *open*; ``close_at_end`` here closes
at the last close.

What this module is not: it does not decide targets (``core.strategies``,
the ensemble), validate bars, or apply risk limits (the risk manager does,
live).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import numba
from numba import njit, prange

from core import metrics as _metrics
from core.metrics import floor_ratio, returns_into, scratch_size, summary_core
from core.bitmask import trailing_zeros
from core.features import price_arrays
from core.strategies import cross_scratch_size, sma_cross_changes, sma_grid_table

# Columns of the raw trade array [P, K, N_TRADE_FIELDS].
ENTRY_BAR, EXIT_BAR, ENTRY_PRICE, EXIT_PRICE, SIZE, PNL, COMMISSION, IS_OPEN = range(8)
N_TRADE_FIELDS = 8

# A hair under 1, as backtesting.py sizes "all equity" orders: equity * 1.0 /
# price can round up past what the cash pays for.
_FULL = 1.0 - 2.0**-52



@njit(cache=True, inline="always")
def _fill_terms(units_delta, price, commission, slippage):
    """(fill price, quantity, commission) of trading ``units_delta`` at ``price`` before slippage."""
    fill_price = price * (1.0 + slippage) if units_delta > 0 else price * (1.0 - slippage)
    qty = abs(units_delta)
    return fill_price, qty, qty * fill_price * commission


@njit(cache=True, inline="always")
def _fill(book, units_delta, price, bar, commission, slippage, trades, n_trades):
    """Trade ``units_delta`` at ``price`` (before slippage); returns (the new book, the new trade count).

    ``book`` is the account, its open trade and its closed trades, as a
    tuple of numbers (they stay in registers): cash, units; the open
    trade's entry bar, side, units and value bought into it, units and
    value sold out of it, and commission paid; then ``core.metrics``' trade
    statistics of the closed trades (count, wins, gross profit, gross
    loss). A fill that leaves the account flat closes the trade: into the
    statistics, and into ``trades[n_trades]`` (a zero-row table records
    nothing).
    """
    (cash, units, entry_bar, sign, in_units, in_value, out_units, out_value, paid,
     closed, wins, gains, losses) = book
    if units_delta == 0.0:
        return book, n_trades
    fill_price, qty, fee = _fill_terms(units_delta, price, commission, slippage)
    cash -= units_delta * fill_price + fee
    if units == 0.0:
        entry_bar = bar
        sign = 1.0 if units_delta > 0 else -1.0
        in_units = 0.0
        in_value = 0.0
        out_units = 0.0
        out_value = 0.0
        paid = 0.0
    paid += fee
    if units_delta * sign > 0:
        in_units += qty
        in_value += qty * fill_price
    else:
        out_units += qty
        out_value += qty * fill_price
    units = units + units_delta
    if units == 0.0:
        pnl = sign * (out_value - in_value) - paid
        closed += 1.0
        if pnl > 0.0:
            wins += 1.0
            gains += pnl
        elif pnl < 0.0:
            losses -= pnl
        if n_trades < trades.shape[0]:
            row = trades[n_trades]
            row[ENTRY_BAR] = entry_bar
            row[EXIT_BAR] = bar
            row[ENTRY_PRICE] = in_value / in_units
            row[EXIT_PRICE] = out_value / out_units
            row[SIZE] = sign * in_units
            row[PNL] = pnl
            row[COMMISSION] = paid
            row[IS_OPEN] = 0.0
        n_trades += 1
    return (cash, units, entry_bar, sign, in_units, in_value, out_units, out_value, paid,
            closed, wins, gains, losses), n_trades


@njit(cache=True, inline="always")
def _closed_into(book, closed_stats):
    """Copy the book's closed-trade statistics (see ``_fill``) out."""
    closed_stats[0] = book[9]
    closed_stats[1] = book[10]
    closed_stats[2] = book[11]
    closed_stats[3] = book[12]


@njit(cache=True, inline="always")
def _target_units(equity, target, price, commission, slippage, whole_units, current):
    """Units to hold for ``target`` given equity marked at ``price``.

    The fill price depends on the trade's direction, which depends on the
    size: size at the price of adding exposure and of cutting it, and trade
    only if the position lies outside that band.
    """
    direction = 1.0 if target > 0 else -1.0
    budget = equity * abs(target) * _FULL
    add_price = price * (1.0 + direction * slippage)
    size_add = budget / (add_price * (1.0 + commission))
    if whole_units:
        size_add = np.floor(size_add)
    held = abs(current)
    if held < size_add:
        return direction * size_add  # the usual case, opening: no need for the other side of the band
    cut_price = price * (1.0 - direction * slippage)
    size_cut = budget / (cut_price * (1.0 + commission))
    if whole_units:
        size_cut = np.floor(size_cut)
    if held > size_cut:
        return direction * size_cut
    return current


@njit(cache=True, inline="always")
def _rebalance(book, target, price, bar, commission, slippage, whole_units, trades, n_trades):
    """Turn a new target into fills at ``price``; returns (the new book, the new trade count)."""
    units = book[1]
    if units != 0.0 and (target == 0.0 or (target > 0) != (units > 0)):
        book, n_trades = _fill(book, -units, price, bar, commission, slippage, trades, n_trades)
    if target != 0.0:
        units = book[1]
        equity = book[0] + units * price
        if equity > 0:
            goal = _target_units(equity, target, price, commission, slippage, whole_units, units)
            book, n_trades = _fill(book, goal - units, price, bar, commission, slippage, trades, n_trades)
    return book, n_trades


@njit(cache=True, error_model="numpy")
def _mark_to_market(close, cash, units, start, stop, equity_out):
    """Equity over bars [start, stop) with no order among them; returns how many are <= 0.

    This loop runs on every bar, so it must vectorise: its index is
    unsigned, because one the compiler cannot prove non-negative (numba
    wraps negative indices) turns every load and store into a gather or
    scatter, and slicing instead costs reference counting on every call.
    """
    broke = 0
    for t in range(np.uint64(start), np.uint64(stop)):
        e = cash + units * close[t]
        equity_out[t] = e
        broke += e <= 0.0
    return broke


@njit(cache=True, error_model="numpy")
def _fill_span(out, value, start, stop):
    """``out[start:stop] = value`` without a slice's reference counting (see ``_mark_to_market``)."""
    for t in range(np.uint64(start), np.uint64(stop)):
        out[t] = value


@njit(cache=True, error_model="numpy")
def _simulate(open_, close, ev_bar, ev_target, n_ev, fill_on_close, commission, slippage, whole_units, cash0,
              close_at_end, equity_out, units_out, trades, closed_stats):
    """One backtest, driven by the bars where the target changes.

    ``ev_bar[:n_ev]`` are the bars (increasing) whose target differs from
    the previous bar's, ``ev_target`` the new targets: what a strategy
    decided, not when it fills. Between two orders nothing trades, so the
    equity of that stretch is one plain loop (vectorised); the order logic
    runs only on the bars that have one. ``units_out`` may have length 0
    (not kept). Returns ``(trades, bars held)``, or ``(-1, 0)`` when an
    order's target is outside [-1, 1] or NaN; ``closed_stats`` receives the
    closed trades' statistics (count, wins, gross profit, gross loss).
    """
    T = close.shape[0]
    keep_units = units_out.shape[0] > 0
    lag = 0 if fill_on_close else 1  # an order fills on its own bar's close, or at the next open
    book = (cash0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # see _fill
    n_trades = 0
    held = 0
    start = 0
    k = 0
    while True:
        stop = ev_bar[k] + lag if k < n_ev else T
        if stop > T:
            stop = T  # the last bar's order, with next-open fills: never filled
        # No order in [start, stop): mark to market, and look for ruin.
        cash, units = book[0], book[1]
        broke = _mark_to_market(close, cash, units, start, stop, equity_out)
        if keep_units:
            _fill_span(units_out, units, start, stop)
        if broke:
            t = start
            while equity_out[t] > 0.0:
                t += 1
            if units != 0.0:
                held += t - start
            # Out of money: liquidate at this close and stop, as a broker would.
            book, n_trades = _fill(book, -units, close[t], t, commission, slippage, trades, n_trades)
            equity_out[t:] = 0.0
            if keep_units:
                units_out[t:] = 0.0
            _closed_into(book, closed_stats)
            return n_trades, held
        if units != 0.0:
            held += stop - start
        if stop == T:
            break
        target = ev_target[k]
        k += 1
        if not (-1.0 <= target <= 1.0):  # NaN fails too; only an order needs checking
            return -1, 0
        price = close[stop] if fill_on_close else open_[stop]
        book, n_trades = _rebalance(book, target, price, stop, commission, slippage, whole_units, trades, n_trades)
        start = stop
    cash, units, entry_bar, sign, in_units, in_value, out_units, out_value, paid = book[:9]
    if units != 0.0:
        if close_at_end:
            book, n_trades = _fill(book, -units, close[T - 1], T - 1, commission, slippage, trades, n_trades)
            equity_out[T - 1] = book[0]
            if keep_units:
                units_out[T - 1] = 0.0
            held -= 1
        else:
            if n_trades < trades.shape[0]:
                qty = abs(units)
                row = trades[n_trades]
                row[ENTRY_BAR] = entry_bar
                row[EXIT_BAR] = -1.0
                row[ENTRY_PRICE] = in_value / in_units
                row[EXIT_PRICE] = close[T - 1]
                row[SIZE] = sign * in_units
                # Unrealised: what closing at the last close would give, before exit commission.
                row[PNL] = sign * (out_value + qty * close[T - 1] - in_value) - paid
                row[COMMISSION] = paid
                row[IS_OPEN] = 1.0
            n_trades += 1
    _closed_into(book, closed_stats)
    return n_trades, held


@njit(cache=True, inline="always")
def _target_changes(targets, ev_bar, ev_target):
    """The bars where ``targets`` differs from the bar before (the first bar: from 0), into ``ev_*``.

    Branch-free: every bar is written and the count moves on only at a
    change, so a target that flips every other bar costs no mispredictions.
    """
    n = 0
    prev = 0.0
    for t in range(targets.shape[0]):
        x = targets[t]
        ev_bar[n] = t
        ev_target[n] = x
        n += x != prev  # NaN differs from everything, so it becomes an order and is refused there
        prev = x
    return n


# Metric levels of the compiled loops (``metric_level``): none, the moments only, every metric.
METRICS_NONE, METRICS_MOMENTS, METRICS_ALL = 0, 1, 2


def metric_level(compute_metrics: bool | str) -> int:
    """``compute_metrics`` as the compiled loops take it.

    True or ``"all"``: every entry of ``core.metrics.SUMMARY_NAMES``;
    ``"moments"``: ``core.metrics.MOMENT_NAMES`` only (returns, volatility,
    Sharpe, Sortino, exposure and the trade tallies; no max drawdown, Calmar,
    VaR or CVaR), for a search that ranks by Sharpe: it skips the drawdown
    pass and the tail selection, and its numbers equal the full set's to the
    bit; False: none.
    """
    if isinstance(compute_metrics, str):
        if compute_metrics in ("all", "moments"):
            return METRICS_ALL if compute_metrics == "all" else METRICS_MOMENTS
    elif compute_metrics is None or isinstance(compute_metrics, (bool, np.bool_)):
        return METRICS_ALL if compute_metrics else METRICS_NONE
    raise ValueError(f"compute_metrics must be True, False, 'all' or 'moments', got {compute_metrics!r}")


@njit(cache=True, error_model="numpy")
def _metrics_of(equity, cash, held, closed_stats, periods_per_year, tail, scratch, cell, out, level):
    """``core.metrics.summary_core`` of a curve ``_simulate`` just wrote (still in cache), as ``summary_row`` would.

    ``level`` 2: every metric; 1: the ``MOMENT_NAMES`` only (no drawdown pass, no tail selection).
    """
    moments = returns_into(equity, cash, scratch)
    full = level >= METRICS_ALL
    lowest, peak = floor_ratio(equity, cash, cell) if full else (1.0, 0.0)
    summary_core(equity, cash, moments, lowest, peak, held, int(closed_stats[0]), int(closed_stats[1]), closed_stats[2],
                 closed_stats[3], periods_per_year, tail, scratch, out, full)


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


@njit(cache=True, parallel=True)
def _scan_targets(targets, changes):
    """Count each row's target changes (a bound on its trades); return how many rows hold a bad value."""
    P, T = targets.shape
    bad = 0
    for p in prange(P):
        prev = 0.0
        n = 0
        ok = True
        for t in range(T):
            x = targets[p, t]
            if not (-1.0 <= x <= 1.0):  # NaN fails this too
                ok = False
            if x != prev:
                n += 1
            prev = x
        changes[p] = n
        if not ok:
            bad += 1
    return bad


@njit(cache=True, inline="always")
def _rebalance_cash(cash, units, target, price, commission, slippage, whole_units):
    """``_rebalance`` for cash and units alone: (cash, units, positions closed). No trade list, no
    bookkeeping of trades: the same fills, with the same arithmetic (``_fill_terms``)."""
    closed = 0
    if units != 0.0 and (target == 0.0 or (target > 0) != (units > 0)):
        fill_price, qty, fee = _fill_terms(-units, price, commission, slippage)
        cash -= -units * fill_price + fee
        units = units + -units
        closed += 1
    if target != 0.0:
        equity = cash + units * price
        if equity > 0:
            delta = _target_units(equity, target, price, commission, slippage, whole_units, units) - units
            if delta != 0.0:
                fill_price, qty, fee = _fill_terms(delta, price, commission, slippage)
                cash -= delta * fill_price + fee
                units = units + delta
                closed += units == 0.0
    return cash, units, closed


@njit(cache=True, inline="always")
def _path_end(closes, commission, slippage, close_at_end, keep_curves, equity, held, cash, units, trades):
    """The trade count after a path's last bar, closing the position there if asked."""
    if trades >= 0 and units != 0.0:
        trades += 1  # the open position, or its close at the end
        if close_at_end:
            T = closes.shape[0]
            fill_price, qty, fee = _fill_terms(-units, closes[T - 1], commission, slippage)
            cash -= -units * fill_price + fee
            if keep_curves:
                equity[T - 1] = cash
                held[T - 1] = 0.0
    return trades


@njit(cache=True, error_model="numpy")
def _change_masks(targets, masks):
    """Bit masks (``core.bitmask``) of the bars whose target differs from the bar before (bar 0: from 0)."""
    T = targets.shape[0]
    for i in range((T + 63) // 64):
        now = targets[64 * i:64 * i + 64]
        word = np.uint64(0)
        if i == 0:
            word = np.uint64(now[0] != 0.0)
            for j in range(1, now.shape[0]):
                word |= np.uint64(now[j] != now[j - 1]) << np.uint64(j)
        else:
            before = targets[64 * i - 1:64 * i + 63]
            for j in range(now.shape[0]):
                word |= np.uint64(now[j] != before[j]) << np.uint64(j)
        masks[i] = word


@njit(cache=True, parallel=True, error_model="numpy")
def _run_paths(open_, close, targets, fill_on_close, commission, slippage, whole_units, cash0, close_at_end,
               keep_curves, equity_out, units_out, n_trades, n_chunks):
    """``_run_batch`` without trade lists or metrics, for Monte Carlo.

    A Monte Carlo rule may trade every few bars, so finding its orders must
    cost little per bar: the changes of target go into bit masks in one
    vectorised pass and are visited a set bit at a time; between two
    orders equity is marked in one vectorised pass (ruin, equity at or
    below zero, is looked for only where it happened), and an order costs its fills
    (``_rebalance_cash``, the engine's arithmetic without the trade
    bookkeeping). Equity, units and trade counts equal ``_run_batch``'s
    (tested).
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
                                                          whole_units)
                    trades += closed
                if not trading:
                    break
            n_trades[p] = _path_end(closes, commission, slippage, close_at_end, keep_curves, equity, held, cash,
                                    units, trades)


@njit(cache=True, error_model="numpy")
def _all_positive_finite(a):
    # Counted, not searched: a loop without an early exit vectorises, and
    # prices are almost always fine (this runs over every Monte Carlo path).
    flat = a.ravel()
    bad = 0
    for i in range(flat.shape[0]):
        x = flat[i]
        bad += not (0.0 < x < np.inf)
    return bad == 0


def _n_chunks(n: int) -> int:
    """How many contiguous chunks a compiled loop splits ``n`` runs into: a few per
    thread, for balance; each chunk allocates its scratch arrays once."""
    return max(1, min(n, 4 * numba.get_num_threads()))


def _check_targets(targets: np.ndarray) -> np.ndarray:
    """Refuse NaN or out-of-range targets; return the number of target changes per row."""
    changes = np.empty(targets.shape[0], dtype=np.int64)
    if _scan_targets(targets, changes):
        raise ValueError("target positions must be finite and lie in [-1, 1] (NaN is not 'hold': repeat the "
                         "previous target)")
    return changes


def _bar_times(bars: Any) -> np.ndarray | None:
    if isinstance(bars, pd.DataFrame):
        if "ts" in bars.columns:
            return bars["ts"].to_numpy()
        if isinstance(bars.index, pd.DatetimeIndex):
            return bars.index.to_numpy()
    return None


def _check_costs(cash: float, commission: float, slippage: float, fill: str) -> None:
    if fill not in ("open", "close"):
        raise ValueError(f"fill must be 'open' or 'close', got {fill!r}")
    if cash <= 0:
        raise ValueError("cash must be positive")
    if commission < 0 or slippage < 0 or slippage >= 1:
        raise ValueError("commission must be >= 0 and slippage in [0, 1)")


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


def simulate_paths(
    close: np.ndarray,
    targets: np.ndarray | Callable[[np.ndarray], np.ndarray],
    *,
    open_: np.ndarray | None = None,
    fill: str | None = None,
    whole_units: bool = False,
    **kwargs,
) -> BatchResult:
    """Monte Carlo: run targets over N price paths ``[N, T]`` with the compiled loop.

    ``targets`` is ``[N, T]`` or a rule mapping the close paths to it (e.g.
    ``lambda c: sma_crossover({"close": ...})``). Without ``open_`` paths,
    orders fill at the close. Units are fractional by default: a simulated
    path has no lot size. No trade list is kept unless ``record_trades=True``.
    """
    close = np.asarray(close, dtype=np.float64)
    if callable(targets):
        targets = targets(close)
    fill = fill or ("close" if open_ is None else "open")
    open_ = close if open_ is None else open_
    kwargs.setdefault("compute_metrics", False)
    kwargs.setdefault("record_trades", False)
    return run_batch(open_, close, targets, fill=fill, whole_units=whole_units, **kwargs)


def simulate_paths_torch(
    close,
    targets,
    *,
    open_=None,
    fill: str | None = None,
    cash: float = 10_000.0,
    commission: float = 0.0,
    slippage: float = 0.0,
    whole_units: bool = False,
    device: str | None = None,
    dtype=None,
):
    """Monte Carlo in torch: the same rules as the compiled loop, vectorised over N paths.

    ``close`` (and ``open_``) are ``[N, T]`` tensors or arrays; ``targets`` is
    ``[N, T]`` or a callable mapping the close tensor to it. ``device``
    defaults to CUDA when available. Returns ``(equity [N, T], units [N, T])``
    as tensors on ``device``. There is no trade list: this path is for
    distributions of outcomes over many paths, not for auditing fills.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or torch.float64
    close = torch.as_tensor(close, dtype=dtype, device=device)
    if callable(targets):
        targets = targets(close)
    targets = torch.as_tensor(targets, dtype=dtype, device=device)
    fill = fill or ("close" if open_ is None else "open")
    if fill not in ("open", "close"):
        raise ValueError(f"fill must be 'open' or 'close', got {fill!r}")
    open_t = close if open_ is None else torch.as_tensor(open_, dtype=dtype, device=device)
    if targets.shape != close.shape or open_t.shape != close.shape:
        raise ValueError("close, open_ and targets must all be [N, T]")
    if not bool(torch.isfinite(targets).all()) or bool((targets.abs() > 1).any()):
        raise ValueError("target positions must be finite and lie in [-1, 1]")
    N, T = close.shape
    cash_t = torch.full((N,), float(cash), dtype=dtype, device=device)
    units = torch.zeros(N, dtype=dtype, device=device)
    acted = torch.zeros(N, dtype=dtype, device=device)
    alive = torch.ones(N, dtype=torch.bool, device=device)
    equity_out = torch.empty((N, T), dtype=dtype, device=device)
    units_out = torch.empty((N, T), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)

    def trade(delta, price, mask):
        delta = torch.where(mask, delta, zero)
        fill_price = torch.where(delta > 0, price * (1 + slippage), price * (1 - slippage))
        return cash_t - delta * fill_price - delta.abs() * fill_price * commission, units + delta

    for t in range(T):
        if fill == "close":
            target, price = targets[:, t], close[:, t]
            pending = (target != acted) & alive
        else:
            if t == 0:
                target, price = acted, open_t[:, 0]
                pending = torch.zeros(N, dtype=torch.bool, device=device)
            else:
                target, price = targets[:, t - 1], open_t[:, t]
                pending = (target != acted) & alive
        flip = pending & (units != 0) & ((target == 0) | ((target > 0) != (units > 0)))
        cash_t, units = trade(-units, price, flip)
        opening = pending & (target != 0)
        equity = cash_t + units * price
        direction = torch.where(target > 0, 1.0, -1.0).to(dtype)
        budget = equity * target.abs() * _FULL
        size_add = budget / (price * (1 + direction * slippage) * (1 + commission))
        size_cut = budget / (price * (1 - direction * slippage) * (1 + commission))
        if whole_units:
            size_add, size_cut = size_add.floor(), size_cut.floor()
        held = units.abs()
        goal = torch.where(held < size_add, direction * size_add, torch.where(held > size_cut, direction * size_cut, units))
        cash_t, units = trade(goal - units, price, opening & (equity > 0))
        acted = torch.where(pending, target, acted)
        equity = cash_t + units * close[:, t]
        broke = alive & (equity <= 0)
        cash_t, units = trade(-units, close[:, t], broke)
        cash_t = torch.where(broke, zero, cash_t)
        alive = alive & ~broke
        equity = torch.where(alive, cash_t + units * close[:, t], zero)
        equity_out[:, t] = equity
        units_out[:, t] = units
    return equity_out, units_out
