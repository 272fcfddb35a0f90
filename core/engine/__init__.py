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

The package: ``kernels`` (the fill rules, compiled: one backtest's orders,
fills, marks and trade book, and the input checks), ``batch`` (``run_batch``,
``backtest_batch``, ``backtest`` and their results), ``sweeps``
(``backtest_sma_grid``) and ``paths`` (``simulate_paths``,
``simulate_paths_torch``). Import the public names from ``core.engine``.

With its defaults the engine reproduces backtesting.py (0.6) running an
always-in-the-market strategy with ``buy()``/``sell()`` after
``position.close()``: the same fills, sizes, commissions and equity, to
1e-6 (tests/test_engine_peer.py). backtesting.py's ``finalize_trades=True``
closes the last trade at the last bar's *open*; ``close_at_end`` here closes
at the last close.

What this package is not: it does not decide targets (``core.strategies``,
the ensemble), validate bars, or apply risk limits (the risk manager does,
live).
"""

from core.engine.batch import BacktestResult, BatchResult, backtest, backtest_batch, run_batch
from core.engine.kernels import (
    COMMISSION,
    ENTRY_BAR,
    ENTRY_PRICE,
    EXIT_BAR,
    EXIT_PRICE,
    IS_OPEN,
    METRICS_ALL,
    METRICS_MOMENTS,
    METRICS_NONE,
    N_TRADE_FIELDS,
    PNL,
    SIZE,
    metric_level,
)
from core.engine.paths import simulate_paths, simulate_paths_torch
from core.engine.sweeps import backtest_sma_grid

__all__ = [
    "COMMISSION", "ENTRY_BAR", "ENTRY_PRICE", "EXIT_BAR", "EXIT_PRICE", "IS_OPEN", "METRICS_ALL", "METRICS_MOMENTS",
    "METRICS_NONE", "N_TRADE_FIELDS", "PNL", "SIZE", "BacktestResult", "BatchResult", "backtest", "backtest_batch",
    "backtest_sma_grid", "metric_level", "run_batch", "simulate_paths", "simulate_paths_torch",
]
