"""Golden-number tests of the backtest engine on hand-made bars.

Every expected number below is worked out by hand in the comments, from the
fill rules in core/engine/__init__.py's docstring; none is copied from the engine's
output. Sizes use backtesting.py's rule: floor(equity * (1 - 2**-52) /
(fill price * (1 + commission))).
"""

import numpy as np
import pandas as pd
import pytest

from core.engine import backtest, backtest_batch, run_batch, simulate_paths, simulate_paths_torch

OPEN = np.array([10.0, 11.0, 12.0, 11.0, 13.0])
CLOSE = np.array([10.5, 11.5, 11.0, 12.5, 13.5])


def bars(open_=OPEN, close=CLOSE, symbol="TEST"):
    """A bar frame in the system's schema."""
    n = len(close)
    return pd.DataFrame(
        {
            "symbol": symbol,
            "ts": pd.date_range("2024-01-01", periods=n, freq="D", tz="UTC"),
            "open": open_,
            "high": np.maximum(open_, close) + 0.5,
            "low": np.minimum(open_, close) - 0.5,
            "close": close,
            "volume": 1000.0,
            "source": "test",
            "seq": np.arange(n),
        }
    )


def test_long_then_flat_then_short_next_open_with_commission():
    r = backtest(bars(), [1, 1, 0, -1, -1], cash=1000.0, commission=0.01)
    # Bar 0: target 1 is decided at the close; nothing is filled yet.
    # Bar 1: buy at open 11: floor(1000 / (11 * 1.01)) = floor(90.009) = 90 units;
    #        cost 990 + commission 9.90 -> cash 0.10; equity 0.10 + 90 * 11.5 = 1035.10.
    # Bar 2: target 1 unchanged; equity 0.10 + 90 * 11 = 990.10.
    # Bar 3: sell 90 at open 11: +990 - 9.90 -> cash 980.20 = equity.
    # Bar 4: short at open 13: floor(980.20 / 13.13) = floor(74.65) = 74 units;
    #        +962 - 9.62 -> cash 1932.58; equity 1932.58 - 74 * 13.5 = 933.58.
    np.testing.assert_allclose(r.equity, [1000.0, 1035.10, 990.10, 980.20, 933.58], atol=1e-9)
    np.testing.assert_array_equal(r.units, [0, 90, 90, 0, -74])
    t = r.trades
    assert list(t.entry_bar) == [1, 4] and list(t.exit_bar) == [3, -1]
    assert list(t.is_open) == [False, True]
    np.testing.assert_allclose(t.entry_price, [11.0, 13.0])
    np.testing.assert_allclose(t["size"], [90, -74])
    # Trade 1: (11 - 11) * 90 - (9.90 + 9.90) = -19.80.
    # Trade 2 (open): -(13.5 - 13) * 74 - 9.62 = -46.62, and 980.20 - 46.62 = 933.58.
    np.testing.assert_allclose(t.pnl, [-19.80, -46.62], atol=1e-9)
    np.testing.assert_allclose(t.commission, [19.80, 9.62], atol=1e-9)
    assert t.exit_price.iloc[0] == 11.0 and t.exit_price.iloc[1] == 13.5  # open trade marked at last close
    assert t.entry_time.iloc[0] == pd.Timestamp("2024-01-02", tz="UTC")
    assert pd.isna(t.exit_time.iloc[1])
    # Win rate and profit factor count closed trades only: one losing trade.
    assert r.metrics["n_trades"] == 1 and r.metrics["win_rate"] == 0.0
    assert r.metrics["final_equity"] == pytest.approx(933.58)
    assert r.metrics["total_return"] == pytest.approx(933.58 / 1000 - 1)


def test_close_at_end_pays_the_exit_commission():
    r = backtest(bars(), [1, 1, 0, -1, -1], cash=1000.0, commission=0.01, close_at_end=True)
    # As above, then buy back 74 at the last close 13.5: -999 - 9.99 -> 1932.58 - 1008.99 = 923.59.
    assert r.equity[-1] == pytest.approx(923.59, abs=1e-9)
    assert r.units[-1] == 0
    t = r.trades
    assert not t.is_open.any() and list(t.exit_bar) == [3, 4]
    # -(13.5 - 13) * 74 - 9.62 - 9.99 = -56.61; 980.20 - 56.61 = 923.59.
    assert t.pnl.iloc[1] == pytest.approx(-56.61, abs=1e-9)
    assert r.metrics["n_trades"] == 2 and r.metrics["profit_factor"] == 0.0  # losses, no gains


def test_reversal_long_to_short_to_long_with_slippage():
    r = backtest(bars(), [1, -1, -1, 1, 1], cash=1000.0, slippage=0.01)
    # Bar 1: buy at 11 * 1.01 = 11.11: floor(1000 / 11.11) = 90; cash 1000 - 999.90 = 0.10;
    #        equity 0.10 + 90 * 11.5 = 1035.10.
    # Bar 2: close long, sell 90 at 12 * 0.99 = 11.88: cash 1069.30 (trade P&L 90 * 0.77 = 69.30);
    #        open short at 11.88: floor(1069.30 / 11.88) = 90; cash 2138.50;
    #        equity 2138.50 - 90 * 11 = 1148.50.
    # Bar 3: equity 2138.50 - 90 * 12.5 = 1013.50.
    # Bar 4: close short, buy 90 at 13 * 1.01 = 13.13: cash 956.80 (P&L -90 * 1.25 = -112.50);
    #        open long at 13.13: floor(956.80 / 13.13) = 72; cash 956.80 - 945.36 = 11.44;
    #        equity 11.44 + 72 * 13.5 = 983.44.
    np.testing.assert_allclose(r.equity, [1000.0, 1035.10, 1148.50, 1013.50, 983.44], atol=1e-9)
    np.testing.assert_array_equal(r.units, [0, 90, -90, -90, 72])
    t = r.trades
    assert list(t.entry_bar) == [1, 2, 4] and list(t.exit_bar) == [2, 4, -1]
    np.testing.assert_allclose(t.entry_price, [11.11, 11.88, 13.13], atol=1e-12)
    np.testing.assert_allclose(t.exit_price.iloc[:2], [11.88, 13.13], atol=1e-12)
    np.testing.assert_allclose(t["size"], [90, -90, 72])
    # Open trade: 72 * (13.5 - 13.13) = 26.64; 956.80 + 26.64 = 983.44.
    np.testing.assert_allclose(t.pnl, [69.30, -112.50, 26.64], atol=1e-9)
    assert r.metrics["win_rate"] == 0.5 and r.metrics["profit_factor"] == pytest.approx(69.30 / 112.50)


def test_fill_at_close_option():
    r = backtest(bars(), [1, 1, 0, 0, 0], cash=1000.0, fill="close")
    # Bar 0: buy at close 10.5: floor(1000 / 10.5) = 95 units, cash 2.50; equity 1000.
    # Bar 1: equity 2.50 + 95 * 11.5 = 1095. Bar 2: sell 95 at close 11 -> 1047.50, then flat.
    np.testing.assert_allclose(r.equity, [1000.0, 1095.0, 1047.5, 1047.5, 1047.5], atol=1e-9)
    t = r.trades
    assert list(t.entry_bar) == [0] and list(t.exit_bar) == [2]
    assert t.pnl.iloc[0] == pytest.approx(95 * 0.5)


def test_next_open_fill_never_fills_the_last_bars_order():
    r = backtest(bars(), [0, 0, 0, 0, 1], cash=1000.0)
    np.testing.assert_array_equal(r.equity, [1000.0] * 5)
    assert len(r.trades) == 0 and np.all(r.units == 0)


def test_whole_versus_fractional_units():
    whole = backtest(bars(), [1, 1, 1, 1, 1], cash=1000.0, commission=0.01)
    frac = backtest(bars(), [1, 1, 1, 1, 1], cash=1000.0, commission=0.01, whole_units=False)
    assert whole.units[1] == 90
    # Fractional: all of the cash buys 1000 / (11 * 1.01) = 90.0090009 units, none left over.
    units = 1000 / 11.11
    assert frac.units[1] == pytest.approx(units, rel=1e-12)
    np.testing.assert_allclose(frac.equity[1:], units * CLOSE[1:], rtol=1e-12)
    # The whole-unit account keeps 0.10 in cash and holds 90 units.
    np.testing.assert_allclose(whole.equity[1:], 0.10 + 90 * CLOSE[1:], atol=1e-9)


def test_exact_division_leaves_one_unit_unbought():
    # 1000 / 10 is exactly 100 units, but the sizing rule scales equity by
    # 1 - 2**-52 (as backtesting.py does), so it buys 99: rounding never
    # spends more than the account holds.
    r = backtest({"open": [10.0, 10.0, 10.0], "close": [10.0, 10.0, 10.0]}, [1, 1, 1], cash=1000.0)
    assert r.units[1] == 99


def test_same_side_resize_trades_only_the_difference():
    prices = np.array([8.0, 10.0, 16.0, 16.0])
    r = backtest({"open": prices, "close": prices}, [0.5, 1.0, 0.25, 0.25], cash=1000.0, fill="close")
    # Bar 0: half of 1000 at 8: floor(62.5) = 62 units, cash 504.
    # Bar 1: equity 504 + 620 = 1124 -> floor(112.4) = 112 units: buy 50 more at 10, cash 4.
    # Bar 2: equity 4 + 112 * 16 = 1796, a quarter is 449 -> floor(28.06) = 28: sell 84 at 16, cash 1348.
    np.testing.assert_array_equal(r.units, [62, 112, 28, 28])
    np.testing.assert_allclose(r.equity, [1000.0, 1124.0, 1796.0, 1796.0], atol=1e-9)
    t = r.trades
    assert len(t) == 1 and bool(t.is_open.iloc[0])
    # One trade: 112 units bought for 496 + 500 = 996, 84 sold for 1344, 28 held at 16.
    assert t["size"].iloc[0] == 112
    assert t.entry_price.iloc[0] == pytest.approx(996 / 112)
    assert t.pnl.iloc[0] == pytest.approx(1344 + 28 * 16 - 996)


def test_constant_target_does_not_rebalance():
    prices = np.array([10.0, 20.0, 40.0])
    r = backtest({"open": prices, "close": prices}, [0.5, 0.5, 0.5], cash=1000.0, fill="close", whole_units=False)
    # Half the account in at 10 (50 units, a hair less for the 1 - 2**-52 guard); the price
    # doubling twice must not trigger sales to get back to 50%.
    assert np.ptp(r.units) == 0
    assert r.equity[-1] == pytest.approx(500 + 50 * 40, rel=1e-12)


def test_short_squeeze_ruins_the_account_and_stops_trading():
    prices = np.array([10.0, 10.0, 30.0, 30.0])
    r = backtest({"open": prices, "close": prices}, [-1, -1, -1, -1], cash=105.0)
    # Bar 1: short floor(105 / 10) = 10 at 10, cash 205, equity 105.
    # Bar 2: equity 205 - 300 = -95 <= 0: bought back at 30, the account stops with 0.
    np.testing.assert_allclose(r.equity, [105.0, 105.0, 0.0, 0.0])
    assert r.trades.pnl.iloc[0] == pytest.approx(-200.0)
    assert r.units[-1] == 0 and len(r.trades) == 1


def test_batch_rows_equal_single_runs_and_shared_bars():
    targets = np.array([[1, 1, 0, -1, -1], [1, -1, -1, 1, 1], [0, 0, 0, 0, 0]], dtype=float)
    batch = backtest_batch(bars(), targets, cash=1000.0, commission=0.01, slippage=0.002)
    for p in range(3):
        single = backtest(bars(), targets[p], cash=1000.0, commission=0.01, slippage=0.002)
        np.testing.assert_array_equal(batch.equity[p], single.equity)
        pd.testing.assert_frame_equal(batch.trades(p), single.trades)
    assert batch.metrics["sharpe"].shape == (3,)
    assert np.all(batch.equity[2] == 1000.0)


@pytest.mark.parametrize("bad", [[0, 2, 0, 0, 0], [0, np.nan, 0, 0, 0]])
def test_targets_outside_minus_one_one_or_nan_are_refused(bad):
    with pytest.raises(ValueError):
        backtest(bars(), bad)


def test_multi_symbol_frame_is_refused():
    frame = pd.concat([bars(symbol="A"), bars(symbol="B")])
    with pytest.raises(ValueError, match="several symbols"):
        backtest(frame, np.zeros(len(frame)))


def _gbm_paths(n, t, seed=7):
    rng = np.random.default_rng(seed)
    log_steps = rng.normal(0.0003, 0.02, size=(n, t))
    close = 100 * np.exp(np.cumsum(log_steps, axis=1))
    open_ = close * np.exp(rng.normal(0, 0.003, size=(n, t)))
    return open_, close


def _momentum_targets(close):
    # Long after an up bar, short after a down bar, sometimes half size: many reversals and resizes.
    change = np.sign(np.diff(close, axis=1, prepend=close[:, :1]))
    size = np.where(close > np.median(close), 1.0, 0.5)
    return change * size


@pytest.mark.parametrize("fill", ["open", "close"])
@pytest.mark.parametrize("whole_units", [False, True])
def test_torch_paths_agree_with_the_compiled_loop(fill, whole_units):
    torch = pytest.importorskip("torch")
    open_, close = _gbm_paths(64, 120)
    targets = _momentum_targets(close)
    costs = dict(cash=10_000.0, commission=0.001, slippage=0.0005, whole_units=whole_units)
    compiled = simulate_paths(close, targets, open_=open_, fill=fill, **costs)
    equity, units = simulate_paths_torch(close, targets, open_=open_, fill=fill, device="cpu", **costs)
    np.testing.assert_allclose(equity.numpy(), compiled.equity, rtol=1e-10)
    np.testing.assert_allclose(units.numpy(), compiled.units, rtol=1e-10)
    assert isinstance(equity, torch.Tensor)


def test_paths_share_rules_with_the_single_market_engine():
    open_, close = _gbm_paths(4, 50, seed=3)
    targets = _momentum_targets(close)
    paths = run_batch(open_, close, targets, commission=0.002)
    for p in range(4):
        one = run_batch(open_[p], close[p], targets[p : p + 1], commission=0.002)
        np.testing.assert_array_equal(paths.equity[p], one.equity[0])


@pytest.mark.gpu
def test_torch_paths_on_cuda_match_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    open_, close = _gbm_paths(256, 100)
    targets = _momentum_targets(close)
    cpu, _ = simulate_paths_torch(close, targets, open_=open_, commission=0.001, device="cpu")
    gpu, _ = simulate_paths_torch(close, targets, open_=open_, commission=0.001, device="cuda")
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-9)


def test_a_metrics_only_sweep_gives_the_same_metrics():
    open_, close = _gbm_paths(1, 300, seed=1)
    targets = _momentum_targets(np.repeat(close, 6, axis=0) * np.linspace(0.9, 1.1, 6)[:, None])
    full = run_batch(open_[0], close[0], targets, commission=0.001)
    lean = run_batch(open_[0], close[0], targets, commission=0.001, keep_curves=False)
    assert lean.equity is None
    for name, value in full.metrics.items():
        np.testing.assert_array_equal(lean.metrics[name], value, err_msg=name)
    np.testing.assert_array_equal(full.metrics["final_equity"], full.equity[:, -1])
    with pytest.raises(ValueError, match="keep_curves"):
        lean[0]


def test_monte_carlo_without_a_trade_list_counts_the_same_trades():
    open_, close = _gbm_paths(8, 200, seed=5)
    targets = _momentum_targets(close)
    lean = simulate_paths(close, targets, open_=open_, commission=0.001)
    full = simulate_paths(close, targets, open_=open_, commission=0.001, record_trades=True)
    np.testing.assert_array_equal(lean.equity, full.equity)
    np.testing.assert_array_equal(lean.n_trades, full.n_trades)
    assert full.n_trades.min() > 10
    # The last trade row of each path is the open one, if a position is held at the end.
    assert all(full.trades(p).is_open.iloc[-1] == (full.units[p, -1] != 0) for p in range(8))
    with pytest.raises(ValueError, match="record_trades"):
        lean.trades(0)


@pytest.mark.parametrize("bad_value, where", [(np.nan, 5), (1.5, 7), (-2.0, 19)])
def test_monte_carlo_refuses_bad_targets_too(bad_value, where):
    # Without a trade list the compiled loop itself checks the targets it acts on.
    _, close = _gbm_paths(3, 20, seed=2)
    targets = np.ones_like(close)
    targets[1, where] = bad_value
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        simulate_paths(close, targets, compute_metrics=True)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        simulate_paths(close, targets, open_=close * 1.001, fill="open")
