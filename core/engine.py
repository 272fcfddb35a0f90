"""The backtest engine: target positions in, fills, equity, trades and metrics out.

Two verbs::

    from core.engine import backtest, backtest_batch
    result = backtest(bars, targets, cash=10_000, commission=0.001)
    batch = backtest_batch(bars, targets_for_many_parameter_sets)   # [P, T]

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
  size trades only the difference.
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
(``cache=True``) and runs parameter sets in parallel. ``simulate_paths`` runs
the same loop over Monte Carlo price paths, and ``simulate_paths_torch`` does
it in torch for large batches on a GPU.

What this module is not: it does not decide targets (``core.strategies``,
the ensemble), validate bars, or apply risk limits (the risk manager does,
live).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
from numba import njit, prange

from core import metrics as _metrics
from core.features import price_arrays

# Columns of the raw trade array [P, K, N_TRADE_FIELDS].
ENTRY_BAR, EXIT_BAR, ENTRY_PRICE, EXIT_PRICE, SIZE, PNL, COMMISSION, IS_OPEN = range(8)
N_TRADE_FIELDS = 8

# A hair under 1, as backtesting.py sizes "all equity" orders: equity * 1.0 /
# price can round up past what the cash pays for.
_FULL = 1.0 - 2.0**-52

# Indices into the per-run state vector of the compiled loop.
_CASH, _UNITS, _EP_ENTRY_BAR, _EP_IN_UNITS, _EP_IN_VALUE, _EP_OUT_UNITS, _EP_OUT_VALUE, _EP_COMM, _EP_SIGN = range(9)


@njit(cache=True, inline="always")
def _fill(state, units_delta, price, bar, commission, slippage, trades, n_trades):
    """Trade ``units_delta`` at ``price`` (before slippage); returns the new trade count."""
    if units_delta == 0.0:
        return n_trades
    fill_price = price * (1.0 + slippage) if units_delta > 0 else price * (1.0 - slippage)
    qty = abs(units_delta)
    fee = qty * fill_price * commission
    state[_CASH] -= units_delta * fill_price + fee
    before = state[_UNITS]
    after = before + units_delta
    if before == 0.0:
        state[_EP_ENTRY_BAR] = bar
        state[_EP_SIGN] = 1.0 if units_delta > 0 else -1.0
        state[_EP_IN_UNITS] = 0.0
        state[_EP_IN_VALUE] = 0.0
        state[_EP_OUT_UNITS] = 0.0
        state[_EP_OUT_VALUE] = 0.0
        state[_EP_COMM] = 0.0
    state[_EP_COMM] += fee
    if units_delta * state[_EP_SIGN] > 0:
        state[_EP_IN_UNITS] += qty
        state[_EP_IN_VALUE] += qty * fill_price
    else:
        state[_EP_OUT_UNITS] += qty
        state[_EP_OUT_VALUE] += qty * fill_price
    state[_UNITS] = after
    if after == 0.0:
        sign = state[_EP_SIGN]
        row = trades[n_trades]
        row[ENTRY_BAR] = state[_EP_ENTRY_BAR]
        row[EXIT_BAR] = bar
        row[ENTRY_PRICE] = state[_EP_IN_VALUE] / state[_EP_IN_UNITS]
        row[EXIT_PRICE] = state[_EP_OUT_VALUE] / state[_EP_OUT_UNITS]
        row[SIZE] = sign * state[_EP_IN_UNITS]
        row[PNL] = sign * (state[_EP_OUT_VALUE] - state[_EP_IN_VALUE]) - state[_EP_COMM]
        row[COMMISSION] = state[_EP_COMM]
        row[IS_OPEN] = 0.0
        n_trades += 1
    return n_trades


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
    cut_price = price * (1.0 - direction * slippage)
    size_add = budget / (add_price * (1.0 + commission))
    size_cut = budget / (cut_price * (1.0 + commission))
    if whole_units:
        size_add = np.floor(size_add)
        size_cut = np.floor(size_cut)
    held = abs(current)
    if held < size_add:
        return direction * size_add
    if held > size_cut:
        return direction * size_cut
    return current


@njit(cache=True)
def _run_one(open_, close, targets, fill_on_close, commission, slippage, whole_units, cash, close_at_end,
             equity_out, units_out, trades):
    T = close.shape[0]
    state = np.zeros(9)
    state[_CASH] = cash
    acted = 0.0  # the last target turned into an order
    n_trades = 0
    ruined = False
    for t in range(T):
        if ruined:
            equity_out[t] = 0.0
            units_out[t] = 0.0
            continue
        if fill_on_close:
            target = targets[t]
            price = close[t]
            pending = target != acted
        else:
            target = targets[t - 1] if t > 0 else 0.0
            price = open_[t]
            pending = t > 0 and target != acted
        if pending:
            units = state[_UNITS]
            if units != 0.0 and (target == 0.0 or (target > 0) != (units > 0)):
                n_trades = _fill(state, -units, price, t, commission, slippage, trades, n_trades)
            if target != 0.0:
                units = state[_UNITS]
                equity = state[_CASH] + units * price
                if equity > 0:
                    goal = _target_units(equity, target, price, commission, slippage, whole_units, units)
                    n_trades = _fill(state, goal - units, price, t, commission, slippage, trades, n_trades)
            acted = target
        equity = state[_CASH] + state[_UNITS] * close[t]
        if equity <= 0.0:
            # Out of money: liquidate at this close and stop, as a broker would.
            n_trades = _fill(state, -state[_UNITS], close[t], t, commission, slippage, trades, n_trades)
            ruined = True
            equity = 0.0
            state[_CASH] = 0.0
        equity_out[t] = equity
        units_out[t] = state[_UNITS]
    if state[_UNITS] != 0.0:
        if close_at_end:
            n_trades = _fill(state, -state[_UNITS], close[T - 1], T - 1, commission, slippage, trades, n_trades)
            equity_out[T - 1] = state[_CASH]
            units_out[T - 1] = 0.0
        else:
            sign = state[_EP_SIGN]
            held = abs(state[_UNITS])
            row = trades[n_trades]
            row[ENTRY_BAR] = state[_EP_ENTRY_BAR]
            row[EXIT_BAR] = -1.0
            row[ENTRY_PRICE] = state[_EP_IN_VALUE] / state[_EP_IN_UNITS]
            row[EXIT_PRICE] = close[T - 1]
            row[SIZE] = sign * state[_EP_IN_UNITS]
            # Unrealised: what closing at the last close would give, before exit commission.
            row[PNL] = sign * (state[_EP_OUT_VALUE] + held * close[T - 1] - state[_EP_IN_VALUE]) - state[_EP_COMM]
            row[COMMISSION] = state[_EP_COMM]
            row[IS_OPEN] = 1.0
            n_trades += 1
    return n_trades


@njit(cache=True, parallel=True)
def _run_batch(open_, close, targets, fill_on_close, commission, slippage, whole_units, cash, close_at_end,
               equity_out, units_out, trades, n_trades):
    P = targets.shape[0]
    last_row = close.shape[0] - 1  # 0 when every parameter set shares one market
    for p in prange(P):
        row = min(np.int64(p), last_row)
        n_trades[p] = _run_one(open_[row], close[row], targets[p], fill_on_close, commission, slippage,
                               whole_units, cash, close_at_end, equity_out[p], units_out[p], trades[p])


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

    Arrays are ``[P, T]``; ``trade_array`` is ``[P, K, N_TRADE_FIELDS]`` with
    ``n_trades[p]`` rows filled for set ``p``; ``metrics`` maps names to ``[P]``.
    """

    equity: np.ndarray
    units: np.ndarray
    trade_array: np.ndarray
    n_trades: np.ndarray
    cash: float
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    times: np.ndarray | None = None

    def __len__(self) -> int:
        return self.equity.shape[0]

    @property
    def returns(self) -> np.ndarray:
        return _metrics.returns_from_equity(self.equity, self.cash)

    def closed_trade_pnl(self) -> np.ndarray:
        """[P, K] P&L of closed trades, NaN-padded (what win rate and profit factor count)."""
        pnl = self.trade_array[:, :, PNL].copy()
        k = np.arange(pnl.shape[1])
        valid = (k[None, :] < self.n_trades[:, None]) & (self.trade_array[:, :, IS_OPEN] == 0)
        pnl[~valid] = np.nan
        return pnl

    def trades(self, p: int) -> pd.DataFrame:
        """Trade list of parameter set ``p``: entry/exit bar and time, prices, size, P&L, commission."""
        rows = self.trade_array[p, : self.n_trades[p]]
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
        return BacktestResult(
            equity=self.equity[p],
            returns=_metrics.returns_from_equity(self.equity[p], self.cash),
            units=self.units[p],
            trades=self.trades(p),
            metrics={k: float(v[p]) for k, v in self.metrics.items()},
            times=self.times,
        )


def _check_targets(targets: np.ndarray) -> None:
    if not np.all(np.isfinite(targets)):
        raise ValueError("target positions must be finite (NaN is not 'hold'; use the previous target)")
    if np.any(np.abs(targets) > 1.0):
        raise ValueError("target positions must lie in [-1, 1]")


def _bar_times(bars: Any) -> np.ndarray | None:
    if isinstance(bars, pd.DataFrame):
        if "ts" in bars.columns:
            return bars["ts"].to_numpy()
        if isinstance(bars.index, pd.DatetimeIndex):
            return bars.index.to_numpy()
    return None


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
    compute_metrics: bool = True,
    periods_per_year: float = _metrics.TRADING_DAYS_PER_YEAR,
    alpha: float = 0.05,
    times: np.ndarray | None = None,
) -> BatchResult:
    """The batched engine on raw arrays.

    ``open_`` and ``close`` are ``[T]`` (one market shared by every parameter
    set) or ``[P, T]`` (one price path per row, for Monte Carlo); ``targets``
    is ``[P, T]``. See the module docstring for the fill rules.
    """
    if fill not in ("open", "close"):
        raise ValueError(f"fill must be 'open' or 'close', got {fill!r}")
    if cash <= 0:
        raise ValueError("cash must be positive")
    if commission < 0 or slippage < 0 or slippage >= 1:
        raise ValueError("commission must be >= 0 and slippage in [0, 1)")
    # Writable C-contiguous float64, so numba compiles one signature (pandas
    # hands out read-only views, a different type to numba).
    targets, close, open_ = (
        np.require(np.atleast_2d(np.asarray(a, dtype=np.float64)), requirements=("C", "W"))
        for a in (targets, close, open_)
    )
    P, T = targets.shape
    if close.shape != open_.shape or close.shape[1] != T or close.shape[0] not in (1, P):
        raise ValueError(f"prices {close.shape} do not match targets {targets.shape}")
    if not (np.all(np.isfinite(close)) and np.all(close > 0) and np.all(np.isfinite(open_)) and np.all(open_ > 0)):
        raise ValueError("open and close prices must be finite and positive")
    _check_targets(targets)
    # Each change of target opens at most one trade, so this bounds the trade list.
    changes = np.count_nonzero(np.diff(targets, axis=1, prepend=0.0), axis=1)
    max_trades = int(changes.max()) + 1 if P else 1
    equity = np.empty((P, T))
    units = np.empty((P, T))
    trades = np.zeros((P, max_trades, N_TRADE_FIELDS))
    n_trades = np.zeros(P, dtype=np.int64)
    _run_batch(open_, close, targets, fill == "close", float(commission), float(slippage), bool(whole_units),
               float(cash), bool(close_at_end), equity, units, trades, n_trades)
    result = BatchResult(equity=equity, units=units, trade_array=trades, n_trades=n_trades, cash=float(cash),
                         times=times)
    if compute_metrics:
        result.metrics = _metrics.summary(
            equity, np.float64(cash), positions=units, trade_pnl=result.closed_trade_pnl(),
            periods_per_year=periods_per_year, alpha=alpha,
        )
    return result


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
    path has no lot size.
    """
    close = np.asarray(close, dtype=np.float64)
    if callable(targets):
        targets = targets(close)
    fill = fill or ("close" if open_ is None else "open")
    open_ = close if open_ is None else open_
    kwargs.setdefault("compute_metrics", False)
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
