"""The engine against backtesting.py on the GOOG daily bars it ships.

backtesting.py's conventions, read from its source (0.6.x) and reproduced by
our engine's defaults:

- market orders fill at the next bar's open (``trade_on_close=False``); an
  order placed on the last bar is never filled;
- ``buy()``/``sell()`` default to ``size = 1 - eps`` of equity, sized as
  ``int(margin_available * (1 - eps) // (price + commission per unit))``:
  whole shares, "nearly all" the cash;
- ``commission`` is charged on entry (on the fill value) and again on exit;
- the SmaCross example closes the position and opens the opposite one on each
  crossing, and ``crossover()`` needs strictly below then strictly above;
- with ``finalize_trades=False`` (the default) the position still open at
  the end is left open: it is not among the closed trades, and the final
  equity marks it at the last close without an exit commission.

Both sides use the same moving average, ``core.features.sma(..., "rolling")``
(pandas' rolling mean, what backtesting.py's own ``SMA`` helper computes).
"""

import warnings

import numpy as np
import pytest

backtesting = pytest.importorskip("backtesting")
from backtesting import Backtest, Strategy  # noqa: E402
from backtesting.lib import crossover  # noqa: E402
from backtesting.test import GOOG  # noqa: E402

from core.engine import backtest, backtest_batch, backtest_sma_grid  # noqa: E402
from core.features import sma  # noqa: E402
from core.strategies import sma_crossover  # noqa: E402


class SmaCross(Strategy):
    n1 = 10
    n2 = 20

    def init(self):
        self.fast = self.I(sma, self.data.Close, self.n1, "rolling")
        self.slow = self.I(sma, self.data.Close, self.n2, "rolling")

    def next(self):
        if crossover(self.fast, self.slow):
            self.position.close()
            self.buy()
        elif crossover(self.slow, self.fast):
            self.position.close()
            self.sell()


def run_peer(n1, n2, commission, trade_on_close=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some trades remain open": that is the point
        bt = Backtest(GOOG, SmaCross, cash=10_000, commission=commission, trade_on_close=trade_on_close)
        return bt.run(n1=n1, n2=n2)


def assert_same_closed_trades(ours, theirs):
    closed = ours[~ours.is_open]
    assert len(closed) == len(theirs) > 10
    np.testing.assert_array_equal(closed.entry_bar.to_numpy(), theirs.EntryBar.to_numpy())
    np.testing.assert_array_equal(closed.exit_bar.to_numpy(), theirs.ExitBar.to_numpy())
    np.testing.assert_array_equal(closed["size"].to_numpy(), theirs.Size.to_numpy())
    np.testing.assert_allclose(closed.entry_price.to_numpy(), theirs.EntryPrice.to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(closed.exit_price.to_numpy(), theirs.ExitPrice.to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(closed.pnl.to_numpy(), theirs.PnL.to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(closed.commission.to_numpy(), theirs.Commission.to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(closed.entry_time.to_numpy(), theirs.EntryTime.to_numpy())


@pytest.mark.parametrize("commission", [0.0, 0.002])
def test_sma_10_20_matches_backtesting_py(commission):
    stats = run_peer(10, 20, commission)
    targets = sma_crossover(GOOG, 10, 20, sma_method="rolling")
    ours = backtest(GOOG, targets, cash=10_000, commission=commission)
    assert_same_closed_trades(ours.trades, stats._trades)
    # One position is still open at the end on both sides.
    assert ours.trades.is_open.sum() == 1
    assert abs(ours.equity[-1] - stats["Equity Final [$]"]) <= 1e-6
    np.testing.assert_allclose(ours.equity, stats._equity_curve.Equity.to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", ["targets", "grid"])
def test_a_batch_of_pairs_matches_backtesting_py_pair_by_pair(path):
    fast = np.array([5, 10, 20, 3])
    slow = np.array([30, 50, 60, 8])
    if path == "targets":
        batch = backtest_batch(GOOG, sma_crossover(GOOG, fast, slow, sma_method="rolling"), cash=10_000,
                               commission=0.001)
    else:  # the fused grid, from bars and windows
        batch = backtest_sma_grid(GOOG, fast, slow, sma_method="rolling", cash=10_000, commission=0.001)
    for p in range(len(fast)):
        stats = run_peer(int(fast[p]), int(slow[p]), 0.001)
        assert_same_closed_trades(batch.trades(p), stats._trades)
        assert abs(batch.equity[p, -1] - stats["Equity Final [$]"]) <= 1e-6


def test_trade_on_close_matches_fill_at_close():
    stats = run_peer(10, 20, 0.002, trade_on_close=True)
    targets = sma_crossover(GOOG, 10, 20, sma_method="rolling")
    # backtesting.py fills a close-order at the *next* iteration, so an order
    # placed on the last bar never fills; ours would fill at that close. Hold
    # the last target so both sides face the same orders.
    targets[-1] = targets[-2]
    ours = backtest(GOOG, targets, cash=10_000, commission=0.002, fill="close")
    assert_same_closed_trades(ours.trades, stats._trades)
    assert abs(ours.equity[-1] - stats["Equity Final [$]"]) <= 1e-6


def test_the_peer_comparison_can_fail():
    # Guard against a vacuous comparison: a different commission must change
    # the final equity by far more than the 1e-6 tolerance.
    stats = run_peer(10, 20, 0.002)
    ours = backtest(GOOG, sma_crossover(GOOG, 10, 20, sma_method="rolling"), cash=10_000, commission=0.001)
    assert abs(ours.equity[-1] - stats["Equity Final [$]"]) > 1.0


def test_finalize_trades_differs_only_in_the_last_exit_price():
    # backtesting.py's finalize_trades=True re-runs its broker on the last bar
    # and so closes the last trade at that bar's *open*; close_at_end closes at
    # the last close. Everything before is the same; the final equity differs
    # by exactly the price difference on that trade, net of commission.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = Backtest(GOOG, SmaCross, cash=10_000, commission=0.002, finalize_trades=True).run()
    ours = backtest(GOOG, sma_crossover(GOOG, 10, 20, sma_method="rolling"), cash=10_000, commission=0.002,
                    close_at_end=True)
    theirs = stats._trades
    assert_same_closed_trades(ours.trades.iloc[:-1], theirs.iloc[:-1])
    last_open, last_close = GOOG.Open.iloc[-1], GOOG.Close.iloc[-1]
    assert theirs.ExitPrice.iloc[-1] == last_open and ours.trades.exit_price.iloc[-1] == last_close
    size = ours.trades["size"].iloc[-1]
    assert size == theirs.Size.iloc[-1]
    expected_gap = (last_close - last_open) * (size - 0.002 * abs(size))
    assert abs((ours.equity[-1] - stats["Equity Final [$]"]) - expected_gap) <= 1e-6
