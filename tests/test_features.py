"""The shared feature function: shape, warm-up, causality, finite memory, hand values."""

import math

import numpy as np
import pandas as pd
import pytest

from core import features
from core.features import (
    FEATURE_NAMES,
    WARMUP,
    atr,
    compute_features,
    feature_spec_hash,
    latest_features,
    rsi,
    window,
)


@pytest.fixture(scope="module")
def goog():
    return pytest.importorskip("backtesting.test").GOOG


@pytest.fixture(scope="module")
def goog_features(goog):
    return compute_features(goog)


def schema_bars(goog):
    """GOOG in the system's bar schema (lower-case columns, UTC ts, symbol/source/seq)."""
    frame = goog.rename(columns=str.lower).reset_index(drop=True)
    frame.insert(0, "ts", pd.DatetimeIndex(goog.index).tz_localize("UTC"))
    frame.insert(0, "symbol", "GOOG")
    return frame.assign(source="test", seq=np.arange(len(frame)))


def test_shape_dtype_and_warmup(goog, goog_features):
    f = goog_features
    assert f.shape == (len(goog), len(FEATURE_NAMES)) and f.dtype == np.float32
    assert np.all(np.isnan(f[:WARMUP]))
    assert np.all(np.isfinite(f[WARMUP:]))
    # WARMUP is tight: the 50-bar SMA first exists at bar 49.
    assert WARMUP == 49
    # The schema frame and backtesting.py's capitalised frame give the same numbers.
    np.testing.assert_array_equal(compute_features(schema_bars(goog)), f)


def test_features_are_causal(goog, goog_features):
    for cut in (WARMUP + 1, 300, 1500):
        np.testing.assert_array_equal(compute_features(goog.iloc[:cut]), goog_features[:cut])
        shocked = goog.copy()
        shocked.iloc[cut:, :4] *= 2.0
        shocked.iloc[cut:, 4] *= 10.0
        np.testing.assert_array_equal(compute_features(shocked)[:cut], goog_features[:cut])


def test_a_live_window_of_warmup_plus_one_bars_gives_the_backtests_row(goog, goog_features):
    # Finite memory: the last row from just WARMUP + 1 bars is bit-identical to
    # the same row computed over the whole history.
    for t in (WARMUP, 777, len(goog) - 1):
        live = compute_features(goog.iloc[t - WARMUP : t + 1])
        np.testing.assert_array_equal(live[-1], goog_features[t])


def test_latest_features_of_a_batch_are_bit_identical_to_each_symbols_own(goog, goog_features):
    # The ensemble computes a batch's features in one pass: every row must be
    # the row compute_features gives that symbol alone, to the bit.
    rng = np.random.default_rng(0)
    arrays = {k: goog[k.capitalize()].to_numpy() for k in ("open", "high", "low", "close", "volume")}
    windows = []
    for _ in range(64):  # windows of different lengths from all over the history
        end = int(rng.integers(WARMUP + 40, len(goog) + 1))
        start = int(rng.integers(0, end - WARMUP - 32 + 1))
        windows.append({k: v[start:end] for k, v in arrays.items()})
    n = 100  # and one whose volume never moves (z-score 0, not NaN)
    windows.append({"open": np.linspace(10, 12, n), "high": np.linspace(10, 12, n) + 0.1,
                    "low": np.linspace(10, 12, n) - 0.1, "close": np.linspace(10, 12, n), "volume": np.full(n, 500.0)})
    for rows in (1, 8, 32):
        got = latest_features(windows, rows)
        assert got.shape == (len(windows), rows, len(FEATURE_NAMES)) and got.dtype == np.float32
        np.testing.assert_array_equal(got, np.stack([compute_features(w)[-rows:] for w in windows]))
    full = latest_features([goog], 32)[0]
    np.testing.assert_array_equal(full, goog_features[-32:])
    with pytest.raises(ValueError, match=f"need {WARMUP + 32} bars"):
        latest_features([{k: v[: WARMUP + 31] for k, v in arrays.items()}], 32)


def test_feature_values_by_hand(goog, goog_features):
    c = goog.Close.to_numpy()
    t = 500
    row = dict(zip(FEATURE_NAMES, goog_features[t]))
    assert row["log_return_1"] == pytest.approx(math.log(c[t] / c[t - 1]), rel=1e-6)
    assert row["log_return_20"] == pytest.approx(math.log(c[t] / c[t - 20]), rel=1e-6)
    assert row["close_to_sma_10"] == pytest.approx(c[t] / c[t - 9 : t + 1].mean() - 1, rel=1e-5)
    one_bar = np.diff(np.log(c[t - 20 : t + 1]))
    assert row["volatility_20"] == pytest.approx(one_bar.std(ddof=1), rel=1e-5)
    v = goog.Volume.to_numpy()[t - 19 : t + 1]
    assert row["volume_zscore_20"] == pytest.approx((v[-1] - v.mean()) / v.std(ddof=1), rel=1e-5)


def test_rsi_and_atr_by_hand():
    close = np.array([10.0, 11.0, 10.5, 11.5, 11.5])
    # Changes +1, -0.5, +1, 0. RSI(3) at bar 3: gains 2, losses 0.5 -> 100 * 2 / 2.5 = 80;
    # at bar 4: changes -0.5, +1, 0 -> 100 * 1 / 1.5 = 66.67.
    np.testing.assert_allclose(rsi(close, 3), [np.nan, np.nan, np.nan, 80.0, 200 / 3], equal_nan=True)
    assert rsi(np.full(6, 5.0), 3)[-1] == 50.0  # no change at all
    high = np.array([10.0, 12.0, 11.0])
    low = np.array([9.0, 10.5, 8.0])
    close = np.array([9.5, 11.0, 8.5])
    # True ranges: bar 1 max(1.5, |12 - 9.5|, |10.5 - 9.5|) = 2.5; bar 2 max(3, |11 - 11|, |8 - 11|) = 3.
    np.testing.assert_allclose(atr(high, low, close, 2), [np.nan, np.nan, 2.75], equal_nan=True)


def test_constant_volume_scores_zero_not_inf():
    n = 80
    bars = {"open": np.linspace(10, 12, n), "high": np.linspace(10, 12, n) + 0.1, "low": np.linspace(10, 12, n) - 0.1,
            "close": np.linspace(10, 12, n), "volume": np.full(n, 500.0)}
    f = compute_features(bars)
    assert np.all(f[WARMUP:, FEATURE_NAMES.index("volume_zscore_20")] == 0.0)


def test_window_returns_the_last_rows_and_refuses_warmup(goog_features):
    np.testing.assert_array_equal(window(goog_features, 32), goog_features[-32:])
    with pytest.raises(ValueError, match="warm-up"):
        window(goog_features[: WARMUP + 10], 20)
    with pytest.raises(ValueError):
        window(goog_features[:5], 10)


def test_feature_spec_hash_tracks_names_and_parameters(monkeypatch):
    h = feature_spec_hash()
    assert len(h) == 64 and h == feature_spec_hash()
    monkeypatch.setitem(features.FEATURE_PARAMS, "rsi_window", 21)
    assert feature_spec_hash() != h


def test_bad_bars_are_refused(goog):
    frame = schema_bars(goog)
    with pytest.raises(ValueError, match="several symbols"):
        compute_features(pd.concat([frame, frame.assign(symbol="MSFT")]))
    with pytest.raises(ValueError, match="time order"):
        compute_features(frame.iloc[::-1])
    with pytest.raises(KeyError):
        compute_features(frame.drop(columns="volume"))


def test_rolling_mean_and_std_are_each_windows_own_numbers():
    rng = np.random.default_rng(5)
    x = rng.normal(100.0, 5.0, (3, 301))
    x[1, 150] = np.nan  # a NaN spoils exactly the windows that hold it
    for n in (1, 2, 3, 7, 14, 50):
        mean = features.rolling_mean(x, n)
        windows = np.lib.stride_tricks.sliding_window_view(x, n, axis=-1)
        assert np.isnan(mean[:, :n - 1]).all()
        np.testing.assert_allclose(mean[:, n - 1:], windows.mean(axis=-1), rtol=1e-14)
        # A window's value is a function of its n values alone, to the bit (finite memory).
        np.testing.assert_array_equal(features.rolling_mean(x[:, 40:], n)[:, n - 1:], mean[:, 40 + n - 1:])
        if n >= 2:
            std = features.rolling_std(x, n)
            np.testing.assert_allclose(std[:, n - 1:], windows.std(axis=-1, ddof=1), rtol=1e-12)
            np.testing.assert_array_equal(features.rolling_std(x[:, 13:], n)[:, n - 1:], std[:, 13 + n - 1:])
    assert np.isnan(features.rolling_mean(x[:, :4], 5)).all()
    # By hand: the means of (1, 2, 3) and (2, 3, 4); the sample std of each is 1.
    np.testing.assert_array_equal(features.rolling_mean(np.array([1.0, 2, 3, 4]), 3)[2:], [2.0, 3.0])
    np.testing.assert_array_equal(features.rolling_std(np.array([1.0, 2, 3, 4]), 3)[2:], [1.0, 1.0])
    with pytest.raises(ValueError, match="window must be >= 2"):
        features.rolling_std(x, 1)
