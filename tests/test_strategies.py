"""Rule strategies: crossings and breakouts worked out by hand, causality, vectorisation."""

import numpy as np
import pandas as pd
import pytest

from core.features import sma, sma_table
from core.strategies import atr_breakout, pair_grid, rsi_reversion, sma_crossover


@pytest.fixture(scope="module")
def goog():
    """Eight years of daily GOOG bars, as shipped with backtesting.py."""
    return pytest.importorskip("backtesting.test").GOOG


def closes(values):
    return {"close": np.asarray(values, dtype=float)}


def test_sma_crossover_known_crossings():
    c = closes([10, 9, 8, 9, 12, 13, 10, 8, 7])
    # SMA2: -, 9.5, 8.5, 8.5, 10.5, 12.5, 11.5, 9, 7.5
    # SMA3: -, -, 9, 8.667, 9.667, 11.333, 11.667, 10.333, 8.333
    # fast crosses above at bar 4 (8.5 < 8.667, then 10.5 > 9.667), below at bar 6 (12.5 > 11.333, then 11.5 < 11.667).
    np.testing.assert_array_equal(sma_crossover(c, 2, 3), [0, 0, 0, 0, 1, 1, -1, -1, -1])
    np.testing.assert_array_equal(sma_crossover(c, 2, 3, allow_short=False), [0, 0, 0, 0, 1, 1, 0, 0, 0])
    # State mode holds sign(fast - slow) from the first bar both exist (bar 2).
    np.testing.assert_array_equal(sma_crossover(c, 2, 3, mode="state"), [0, 0, -1, -1, 1, 1, -1, -1, -1])


def test_a_touch_is_not_a_crossing():
    c = closes([10, 10, 10, 13, 13, 13, 7, 7, 7, 7])
    # SMA2: -, 10, 10, 11.5, 13, 13, 10, 7, 7, 7;  SMA3: -, -, 10, 11, 12, 13, 11, 9, 7, 7.
    # Fast passes from equal (bar 2) to above (bar 3): backtesting.py's crossover() needs
    # strictly below first, so no crossing ever fires; state mode sees the sides.
    np.testing.assert_array_equal(sma_crossover(c, 2, 3), np.zeros(10))
    np.testing.assert_array_equal(sma_crossover(c, 2, 3, mode="state"), [0, 0, 0, 1, 1, 0, -1, -1, 0, 0])


def test_atr_breakout_known_case():
    close = np.array([10, 10, 10, 14, 14, 9, 9, 9.5])
    high = close.copy()
    high[7] = 12.0
    bars = {"high": high, "low": close.copy(), "close": close}
    # SMA2 (mid): -, 10, 10, 12, 14, 11.5, 9, 9.25.  True range (ATR window 1): -, 0, 0, 4, 0, 5, 0, 3.
    # k = 0.25: bar 3: 14 > 12 + 1 -> long; bar 4: 14 is on both bands -> hold;
    # bar 5: 9 < 11.5 - 1.25 -> short; bar 6: hold; bar 7: 9.5 inside 9.25 +- 0.75 but above mid -> flat.
    np.testing.assert_array_equal(atr_breakout(bars, 2, 0.25, atr_window=1), [0, 0, 0, 1, 1, -1, -1, 0])


def test_rsi_reversion_known_case():
    c = closes([10, 9, 8, 9, 10, 11, 10])
    # RSI(2): bar 2: two losses -> 0 (< 30: long); bar 3: one up, one down -> 50 (exit long);
    # bars 4, 5: two gains -> 100 (> 70: short); bar 6: one each -> 50 (exit short).
    np.testing.assert_array_equal(rsi_reversion(c, 2, 30, 70, 50), [0, 0, 1, 0, -1, -1, 0])


def test_parameter_sets_are_vectorised(goog):
    """A grid runs the parallel build of each kernel, one parameter set its serial twin (core.jit): the same numbers."""
    fast = np.array([5, 10, 20])
    slow = np.array([30, 20, 50])
    batch = sma_crossover(goog, fast, slow)
    assert batch.shape == (3, len(goog))
    for p in range(3):
        np.testing.assert_array_equal(batch[p], sma_crossover(goog, int(fast[p]), int(slow[p])))
    atr_b = atr_breakout(goog, [10, 20], [1.0, 2.0])
    np.testing.assert_array_equal(atr_b[1], atr_breakout(goog, 20, 2.0))
    rsi_b = rsi_reversion(goog, [7, 14], 25, [75, 70])
    np.testing.assert_array_equal(rsi_b[0], rsi_reversion(goog, 7, 25, 75))
    # Broadcasting: one slow window against many fast ones.
    assert sma_crossover(goog, [3, 4, 5], 30).shape == (3, len(goog))


def test_targets_are_in_range_and_trade(goog):
    for targets in (
        sma_crossover(goog, [5, 10], [20, 40]),
        atr_breakout(goog, [10, 20], [0.5, 1.5]),
        rsi_reversion(goog, [7, 14]),
    ):
        assert set(np.unique(targets)) <= {-1.0, 0.0, 1.0}
        # Each parameter set changes position at least a few times on 8 years of GOOG.
        assert np.all(np.count_nonzero(np.diff(targets, axis=1), axis=1) >= 4)


@pytest.mark.parametrize(
    "strategy",
    [
        lambda b: sma_crossover(b, [5, 10], [20, 30]),
        lambda b: sma_crossover(b, [5, 10], [20, 30], mode="state"),
        lambda b: atr_breakout(b, [10, 20], [0.5, 1.5]),
        lambda b: rsi_reversion(b, [7, 14]),
    ],
)
def test_strategies_are_causal(goog, strategy):
    full = strategy(goog)
    for cut in (60, 333, 1000):
        # Targets up to bar cut-1 from bars up to cut-1 equal the full-history targets...
        np.testing.assert_array_equal(strategy(goog.iloc[:cut]), full[:, :cut])
        # ...and a wild change to later bars leaves them alone.
        shocked = goog.copy()
        shocked.iloc[cut:, :4] *= 3.0
        np.testing.assert_array_equal(strategy(shocked)[:, :cut], full[:, :cut])


def test_rolling_sma_is_pandas_rolling_mean(goog):
    # backtesting.py's SMA helper is pd.Series(x).rolling(n).mean(); "rolling" must be exactly that.
    expected = pd.Series(goog.Close.to_numpy()).rolling(20).mean().to_numpy()
    np.testing.assert_array_equal(sma(goog.Close, 20, method="rolling"), expected)
    window = sma(goog.Close, 20, method="window")
    np.testing.assert_allclose(window, expected, rtol=1e-12)
    with pytest.raises(ValueError):
        sma(goog.Close, 20, method="ewm")


def test_pair_grid_keeps_fast_below_slow():
    fast, slow = pair_grid(range(2, 6), range(4, 7))
    assert np.all(fast < slow)
    # fast 2..5 x slow 4..6 minus pairs with fast >= slow: (4,4), (5,4), (5,5).
    assert len(fast) == 4 * 3 - 3


def test_compiled_rolling_sma_is_bit_identical_to_pandas(goog):
    rng = np.random.default_rng(4)
    series = {
        "goog": goog.Close.to_numpy(float),
        "random walk": 100 + np.cumsum(rng.normal(0, 1, 3000)),
        "crosses zero": np.cumsum(rng.normal(0, 1, 800)),  # pandas' sign rules
        "flat stretches": np.repeat(rng.normal(50, 5, 60), rng.integers(1, 40, 60)),  # same-value rule
        "tiny and huge": np.concatenate([rng.normal(0, 1e-9, 300), rng.normal(1e9, 1, 300)]),
    }
    windows = np.array([1, 2, 3, 7, 10, 20, 33, 50, 100, 250])
    for name, x in series.items():
        table = sma_table(x, windows, "rolling")
        for row, n in zip(table, windows):
            expected = pd.Series(x).rolling(int(n)).mean().to_numpy()
            np.testing.assert_array_equal(row, expected, err_msg=f"{name}, window {n}")
