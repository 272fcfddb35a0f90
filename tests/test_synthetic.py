"""The synthetic market: valid bars, the same for the same seed, regimes that switch."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.bars import validate_bars
from core.synthetic import REGIMES, SyntheticMarket, generate_bars


def test_bars_pass_validation_and_are_reproducible():
    a = generate_bars(["SPY", "QQQ", "AAPL"], 3000, seed=5)
    b = generate_bars(["SPY", "QQQ", "AAPL"], 3000, seed=5)
    c = generate_bars(["SPY", "QQQ", "AAPL"], 3000, seed=6)
    assert validate_bars(a)[1] == []
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["close"].to_numpy(), c["close"].to_numpy())


def test_live_and_batch_agree_and_symbols_are_independent():
    live = SyntheticMarket(["SPY", "QQQ"], seed=9)
    rows = pd.concat([live.next() for _ in range(50)])
    batch = SyntheticMarket(["QQQ", "SPY", "MSFT"], seed=9).generate(50)
    for sym in ("SPY", "QQQ"):
        a = rows[rows.symbol == sym].reset_index(drop=True)
        b = batch[batch.symbol == sym].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)


def test_regimes_switch_and_differ_in_volatility():
    df = SyntheticMarket(["SPY"], seed=1).generate(20_000, with_regime=True)
    seen = set(df["regime"])
    assert seen == set(REGIMES)
    switches = int((df["regime"] != df["regime"].shift()).sum()) - 1
    assert 50 < switches < 500  # p(stay) = 0.99 -> about 200 switches
    r = np.log(df["close"]).diff()
    vol = r.groupby(df["regime"]).std()
    assert vol["volatile"] > 2 * vol["ranging"]
