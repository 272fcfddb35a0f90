"""The engine's fill rules, compiled: one backtest's orders, fills, marks and trade book.

Every simulator in ``core.engine`` is built from these: ``_simulate`` runs one
backtest over the bars where its target changes (trade list, closed-trade
statistics); ``_rebalance_cash`` is ``_rebalance`` for cash and units alone,
for loops that keep no trade list (``batch._run_paths``). The rules themselves are
stated in ``core.engine``'s docstring; ``core.engine.paths.simulate_paths_torch``
writes them once more in torch, tested equal.

Also here: the checks every entry point runs on its inputs (costs, targets,
prices) and ``metric_level``. Not here: looping over parameter sets
(``batch``, ``sweeps``), results (``batch``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from core.metric_kernels import floor_ratio, returns_into, summary_core

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
def _rebalance_cash(cash, units, target, price, commission, slippage, whole_units, no_trades):
    """``_rebalance`` for cash and units alone: (cash, units, positions closed), for loops that keep
    no trade list. It is ``_rebalance`` itself, on a fresh book and a zero-row trade table
    (``no_trades``): the fills and their arithmetic are the one copy, and the trade bookkeeping,
    whose results nobody reads, is dead code the compiler drops (bench_engine's Monte Carlo line)."""
    book = (cash, units, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # see _fill
    book, closed = _rebalance(book, target, price, 0, commission, slippage, whole_units, no_trades, 0)
    return book[0], book[1], closed


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


def _check_costs(cash: float, commission: float, slippage: float, fill: str) -> None:
    if fill not in ("open", "close"):
        raise ValueError(f"fill must be 'open' or 'close', got {fill!r}")
    if cash <= 0:
        raise ValueError("cash must be positive")
    if commission < 0 or slippage < 0 or slippage >= 1:
        raise ValueError("commission must be >= 0 and slippage in [0, 1)")
