"""The engine's fast paths against slow, plain references, to the last bit.

The compiled loops are driven by the bars where targets change, find those
bars (and the VaR tail) through bit masks, and have two specialised
kernels: ``backtest_sma_grid`` (SMA crossover grids without a target
matrix) and the Monte Carlo path kernel behind ``simulate_paths``. Each is
held here to something written the obvious way: the engine's rules walked
bar by bar in Python, the crossover rule bar by bar, numpy's sort, pandas'
rolling mean, the general ``backtest_batch`` path. The random cases include
ruin, slippage, both fill times, whole and fractional units, touches and
NaN warm-ups, so a shortcut that is wrong only sometimes has room to show.
"""

import numpy as np
import pandas as pd
import pytest

from core import metrics as m
from core.bitmask import gather_set, mask_at_most
from core.engine import (
    IS_OPEN,
    PNL,
    backtest_batch,
    backtest_sma_grid,
    run_batch,
    simulate_paths,
)
from core.features import sma_table
from core.strategies import sma_crossover

FULL = 1.0 - 2.0**-52


def reference_backtest(open_, close, targets, cash, commission, slippage, fill, whole_units, close_at_end):
    """The module docstring's rules, bar by bar, in plain Python: (equity, units, closed-trade P&L, trades).

    Written from core/engine/__init__.py's docstring, not from the compiled code;
    the arithmetic is spelled in the same order so results can match to
    the bit.
    """
    T = len(close)
    equity, held = np.zeros(T), np.zeros(T)
    cash_, units, acted, n_trades = cash, 0.0, 0.0, 0
    episode = {}
    closed_pnl = []

    def trade(delta, price, commission_, slippage_):
        nonlocal cash_, units, n_trades
        if delta == 0.0:
            return
        fill_price = price * (1.0 + slippage_) if delta > 0 else price * (1.0 - slippage_)
        qty = abs(delta)
        fee = qty * fill_price * commission_
        cash_ -= delta * fill_price + fee
        if units == 0.0:
            episode.update(sign=1.0 if delta > 0 else -1.0, in_value=0.0, out_value=0.0, comm=0.0)
        episode["comm"] += fee
        if delta * episode["sign"] > 0:
            episode["in_value"] += qty * fill_price
        else:
            episode["out_value"] += qty * fill_price
        units = units + delta
        if units == 0.0:
            closed_pnl.append(episode["sign"] * (episode["out_value"] - episode["in_value"]) - episode["comm"])
            n_trades += 1

    def size(equity_, target, price):
        direction = 1.0 if target > 0 else -1.0
        budget = equity_ * abs(target) * FULL
        add = budget / (price * (1.0 + direction * slippage) * (1.0 + commission))
        cut = budget / (price * (1.0 - direction * slippage) * (1.0 + commission))
        if whole_units:
            add, cut = np.floor(add), np.floor(cut)
        if abs(units) < add:
            return direction * add
        if abs(units) > cut:
            return direction * cut
        return units

    for t in range(T):
        if fill == "close":
            target, price, pending = targets[t], close[t], targets[t] != acted
        else:
            target = targets[t - 1] if t > 0 else 0.0
            price, pending = open_[t], t > 0 and target != acted
        if pending:
            if units != 0.0 and (target == 0.0 or (target > 0) != (units > 0)):
                trade(-units, price, commission, slippage)
            if target != 0.0:
                e = cash_ + units * price
                if e > 0:
                    trade(size(e, target, price) - units, price, commission, slippage)
            acted = target
        e = cash_ + units * close[t]
        if e <= 0.0:
            trade(-units, close[t], commission, slippage)
            return equity, held, closed_pnl, n_trades  # ruined: zeros from here on
        equity[t], held[t] = e, units
    if units != 0.0:
        if close_at_end:
            trade(-units, close[T - 1], commission, slippage)
            equity[T - 1], held[T - 1] = cash_, 0.0
        else:
            n_trades += 1
    return equity, held, closed_pnl, n_trades


def random_case(rng, n_sets):
    T = int(rng.integers(3, 250))
    close = 100 * np.exp(np.cumsum(rng.normal(0, rng.choice([0.01, 0.05, 0.3]), T)))
    open_ = close * np.exp(rng.normal(0, 0.01, T))
    kind = rng.integers(0, 3)
    if kind == 0:
        targets = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=(n_sets, T))
    elif kind == 1:
        targets = np.repeat(rng.choice([-1.0, 0.0, 1.0], size=(n_sets, T // 5 + 1)), 5, axis=1)[:, :T]
    else:
        targets = np.sign(rng.normal(size=(n_sets, T))) * rng.choice([1.0, 0.3], size=(n_sets, 1))
    costs = dict(cash=float(rng.choice([100.0, 10_000.0])), commission=float(rng.choice([0.0, 0.001, 0.02])),
                 slippage=float(rng.choice([0.0, 0.0005, 0.01])), fill=str(rng.choice(["open", "close"])),
                 whole_units=bool(rng.integers(2)), close_at_end=bool(rng.integers(2)))
    return open_, close, targets, costs


def test_the_compiled_engine_is_the_rules_walked_bar_by_bar():
    rng = np.random.default_rng(20)
    ruined = 0
    for _ in range(40):
        open_, close, targets, costs = random_case(rng, 6)
        batch = run_batch(open_, close, targets, **costs)
        for p in range(len(targets)):
            equity, held, pnl, n_trades = reference_backtest(open_, close, targets[p], **costs)
            np.testing.assert_array_equal(batch.equity[p], equity)
            np.testing.assert_array_equal(batch.units[p], held)
            assert batch.n_trades[p] == n_trades
            rows = batch.trade_array[batch.trade_offsets[p]: batch.trade_offsets[p] + n_trades]
            np.testing.assert_array_equal(rows[rows[:, IS_OPEN] == 0, PNL], pnl)
            ruined += equity[-1] == 0.0
    assert ruined > 0  # the cases reach ruin, so that path is compared too


def test_the_compiled_metrics_are_core_metrics_summary_of_the_curves():
    # The engine computes each set's metrics right after simulating it, and
    # the closed trades' statistics as it fills; summary() from the finished
    # curves, units and trade list must give the same numbers to the bit,
    # with or without a trade list kept.
    rng = np.random.default_rng(28)
    for _ in range(20):
        open_, close, targets, costs = random_case(rng, 6)
        batch = run_batch(open_, close, targets, **costs)
        expected = m.summary(batch.equity, costs["cash"], positions=batch.units, trade_pnl=batch.closed_trade_pnl())
        lean = run_batch(open_, close, targets, record_trades=False, keep_curves=False, **costs)
        for name, value in expected.items():
            np.testing.assert_array_equal(batch.metrics[name], value, err_msg=name)
            np.testing.assert_array_equal(lean.metrics[name], value, err_msg=name)


def test_the_monte_carlo_kernel_equals_the_general_loop():
    # Without metrics or a trade list run_batch takes the path kernel; with a
    # trade list, the general loop. Same equity, units and trade counts.
    rng = np.random.default_rng(21)
    ruined = 0
    for _ in range(40):
        open_, close, targets, costs = random_case(rng, 8)
        paths = np.exp(np.cumsum(rng.normal(0, 0.05, (8, close.size)), axis=1)) * close
        for o, c in ((open_, close), (paths * 1.001, paths)):
            lean = run_batch(o, c, targets, compute_metrics=False, record_trades=False, **costs)
            full = run_batch(o, c, targets, compute_metrics=False, record_trades=True, **costs)
            np.testing.assert_array_equal(lean.equity, full.equity)
            np.testing.assert_array_equal(lean.units, full.units)
            np.testing.assert_array_equal(lean.n_trades, full.n_trades)
            ruined += int(np.sum(full.equity[:, -1] == 0.0))
    assert ruined > 0
    # simulate_paths is that kernel, fractional units and close fills by default.
    close = paths
    targets = np.sign(np.diff(close, axis=1, prepend=close[:, :1]))
    np.testing.assert_array_equal(simulate_paths(close, targets, commission=0.001).equity,
                                  run_batch(close, close, targets, commission=0.001, fill="close", whole_units=False,
                                            compute_metrics=False).equity)


def reference_crossover(fast, slow, mode, short):
    """sma_crossover's rule written bar by bar (NaN compares False)."""
    out, pos = np.zeros(len(fast)), 0.0
    for t in range(len(fast)):
        if mode == "cross":
            if t > 0 and fast[t - 1] < slow[t - 1] and fast[t] > slow[t]:
                pos = 1.0
            elif t > 0 and fast[t - 1] > slow[t - 1] and fast[t] < slow[t]:
                pos = short
        else:
            pos = 1.0 if fast[t] > slow[t] else (short if fast[t] < slow[t] else 0.0)
        out[t] = pos
    return out


@pytest.mark.parametrize("mode", ["cross", "state"])
def test_crossover_targets_are_the_rule_bar_by_bar(mode):
    rng = np.random.default_rng(22)
    # Rounded prices make equal averages (touches) common; 150 bars span three 64-bar words.
    close = np.round(100 + np.cumsum(rng.normal(0, 1, 150)))
    fast, slow = rng.integers(1, 12, 40), rng.integers(1, 30, 40)
    table = {n: sma_table(close, [n], "rolling")[0] for n in set(fast) | set(slow)}
    for allow_short in (True, False):
        targets = sma_crossover({"close": close}, fast, slow, mode=mode, sma_method="rolling",
                                allow_short=allow_short)
        for p in range(len(fast)):
            expected = reference_crossover(table[fast[p]], table[slow[p]], mode, -1.0 if allow_short else 0.0)
            np.testing.assert_array_equal(targets[p], expected, err_msg=f"{fast[p]}/{slow[p]}")


def assert_same_batch(grid, general):
    for name in ("equity", "units", "n_trades", "trade_offsets"):
        np.testing.assert_array_equal(getattr(grid, name), getattr(general, name), err_msg=name)
    assert set(grid.metrics) == set(general.metrics)
    for name, value in general.metrics.items():
        np.testing.assert_array_equal(grid.metrics[name], value, err_msg=name)
    for p in range(len(general)):
        n = general.n_trades[p]
        start = general.trade_offsets[p]
        np.testing.assert_array_equal(grid.trade_array[start:start + n], general.trade_array[start:start + n])


def test_the_sma_grid_is_the_general_path():
    goog = pytest.importorskip("backtesting.test").GOOG
    rng = np.random.default_rng(23)
    for trial in range(24):
        if trial % 4 == 0:
            bars = goog
        else:
            T = int(rng.integers(20, 400))
            c = 100 * np.exp(np.cumsum(rng.normal(0, 0.03, T)))
            bars = {"open": c * np.exp(rng.normal(0, 0.01, T)), "close": c}
        P = int(rng.integers(1, 30))
        fast, slow = rng.integers(1, 30, P), rng.integers(1, 80, P)
        rule = dict(mode=str(rng.choice(["cross", "state"])), sma_method=str(rng.choice(["window", "rolling"])),
                    allow_short=bool(rng.integers(2)))
        costs = dict(cash=float(rng.choice([1_000.0, 10_000.0])), commission=float(rng.choice([0.0, 0.002])),
                     slippage=float(rng.choice([0.0, 0.001])), fill=str(rng.choice(["open", "close"])),
                     whole_units=bool(rng.integers(2)), close_at_end=bool(rng.integers(2)),
                     keep_curves=bool(rng.integers(2)))
        general = backtest_batch(bars, sma_crossover(bars, fast, slow, **rule), **costs)
        assert_same_batch(backtest_sma_grid(bars, fast, slow, **rule, **costs), general)
        # Without the trade list, every metric is still there, and the same.
        lean = backtest_sma_grid(bars, fast, slow, **rule, **costs, record_trades=False)
        for name, value in general.metrics.items():
            np.testing.assert_array_equal(lean.metrics[name], value, err_msg=name)
        # The moments level: exactly the moment metrics, each the full set's to the bit, on both paths.
        for moments in (backtest_sma_grid(bars, fast, slow, **rule, **costs, record_trades=False,
                                          compute_metrics="moments"),
                        backtest_batch(bars, sma_crossover(bars, fast, slow, **rule), **costs,
                                       compute_metrics="moments")):
            assert sorted(moments.metrics) == sorted(m.MOMENT_NAMES)
            for name in m.MOMENT_NAMES:
                np.testing.assert_array_equal(moments.metrics[name], general.metrics[name], err_msg=name)


def test_metric_levels_are_named_and_a_wrong_one_is_refused():
    assert set(m.SUMMARY_NAMES) - set(m.MOMENT_NAMES) == {"max_drawdown", "calmar", "var", "cvar"}
    bars = {"open": np.linspace(10, 12, 40), "close": np.linspace(10.1, 12.1, 40)}
    assert backtest_sma_grid(bars, 2, 5, compute_metrics=False).metrics == {}
    assert sorted(backtest_sma_grid(bars, 2, 5, compute_metrics="all").metrics) == sorted(m.SUMMARY_NAMES)
    assert sorted(backtest_sma_grid(bars, 2, 5, compute_metrics=np.True_).metrics) == sorted(m.SUMMARY_NAMES)
    for wrong in ("sharpe", 1):
        with pytest.raises(ValueError, match="'all' or 'moments'"):
            backtest_sma_grid(bars, 2, 5, compute_metrics=wrong)


def test_the_sma_grid_refuses_what_sma_crossover_refuses():
    bars = {"open": np.full(10, 10.0), "close": np.full(10, 10.0)}
    with pytest.raises(ValueError, match="mode"):
        backtest_sma_grid(bars, 2, 3, mode="edge")
    with pytest.raises(ValueError, match=">= 1"):
        backtest_sma_grid(bars, 0, 3)
    with pytest.raises(ValueError, match="positive"):
        backtest_sma_grid({"open": np.full(10, 10.0), "close": np.r_[np.full(9, 10.0), np.nan]}, 2, 3)


def test_bit_masks_mark_and_gather_exactly_the_values_at_most_the_edge():
    rng = np.random.default_rng(24)
    for T in (1, 63, 64, 65, 200):
        x = rng.normal(size=T)
        x[rng.random(T) < 0.1] = np.nan
        masks = np.empty((T + 63) // 64, dtype=np.uint64)
        out = np.empty(T)
        count = mask_at_most(x, 0.3, masks)
        n = gather_set(x, masks, out)
        assert count == n == np.sum(x <= 0.3)
        np.testing.assert_array_equal(out[:n], x[x <= 0.3])


def test_drawdown_is_exactly_numpys_on_curves_that_stress_the_shortcuts():
    rng = np.random.default_rng(25)
    curves = [
        1000 * np.cumprod(1 + rng.normal(0.0004, 0.012, 700)),  # new highs scattered
        np.r_[np.linspace(1000, 2000, 300), np.linspace(2000, 900, 300), np.linspace(900, 2100, 300)],
        np.r_[1000 * np.cumprod(1 + rng.normal(0, 0.02, 400)), np.zeros(100)],  # ruin
        np.full(500, 1000.0),
        np.r_[np.full(100, 1000.0), -np.abs(rng.normal(50, 10, 50)), np.full(100, 500.0)],  # below zero
    ]
    for curve in curves:
        summary = m.summary(curve, 1000.0)
        expected = m.max_drawdown(np.r_[1000.0, curve])
        assert summary["max_drawdown"] == expected


def test_the_tail_selection_is_numpys_sort():
    rng = np.random.default_rng(26)
    buf = np.empty(400)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        k = int(rng.integers(1, n + 1))
        x = [rng.normal(size=n), rng.integers(0, 4, n).astype(float), np.zeros(n)][trial % 3]
        a = x.copy()
        guess = [np.nan, rng.normal(), 0.0][trial % 3]  # none, a value maybe outside, an exact value
        m._smallest_first(a, n, k, buf, guess)
        np.testing.assert_array_equal(np.sort(a), np.sort(x))  # a permutation...
        np.testing.assert_array_equal(np.sort(a[:k]), np.sort(x)[:k])  # ...with the k smallest first


def test_rolling_sma_table_edge_cases_are_pandas():
    rng = np.random.default_rng(27)
    windows = np.array([1, 2, 3, 5, 8, 13, 50, 200, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # 17: a short last group of 8
    for T in (1, 2, 7, 100):
        for x in (rng.normal(size=T), -np.abs(rng.normal(size=T)), np.repeat(rng.normal(size=T), 2)[:T],
                  np.where(rng.random(T) < 0.5, -0.0, 1.0)):
            table = sma_table(x, windows, "rolling")
            for row, n in zip(table, windows):
                expected = pd.Series(x).rolling(int(n)).mean().to_numpy()
                np.testing.assert_array_equal(row, expected)
                np.testing.assert_array_equal(np.signbit(row), np.signbit(expected))
