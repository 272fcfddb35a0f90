"""The one feature function: bars in, a float32 feature matrix out.

Live decisions (the Serve ingress and the ensemble), backtests and the RL
learner all call :func:`compute_features`, so a model sees the same numbers in
training, in a backtest and in production. The indicator primitives the rule
strategies use (:func:`sma`, :func:`rsi`, :func:`atr`) live here too, so there
is one implementation of each.

Every feature is causal and has *finite memory*: row ``t`` depends on bars
``t - WARMUP .. t`` and nothing else. Rolling statistics are therefore computed
window by window (each window summed afresh), not with a running sum whose
rounding drifts with the length of the history; RSI and ATR use simple means
over their window (Cutler's RSI), not Wilder's recursive smoothing, whose value
depends on where the series started. The upshot: the last row computed from a
live window of ``WARMUP + 1`` bars is bit-identical to the same row of a
backtest over ten years of bars.

This module is not a bar validator (bars are validated where they enter the
system) and does not resample, align or join symbols: it takes one symbol's
bars in time order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from numba import njit, prange

# Parameters of every feature. Changing any of them changes feature_spec_hash(),
# which models record, so a model is never fed features it was not trained on.
FEATURE_PARAMS: dict[str, Any] = {
    "return_lags": (1, 5, 20),
    "volatility_window": 20,
    "sma_windows": (10, 50),
    "rsi_window": 14,
    "atr_window": 14,
    "volume_window": 20,
    "dtype": "float32",
    "version": 1,
}

FEATURE_NAMES: tuple[str, ...] = (
    *(f"log_return_{k}" for k in FEATURE_PARAMS["return_lags"]),
    f"volatility_{FEATURE_PARAMS['volatility_window']}",
    *(f"close_to_sma_{n}" for n in FEATURE_PARAMS["sma_windows"]),
    f"rsi_{FEATURE_PARAMS['rsi_window']}",
    f"atr_{FEATURE_PARAMS['atr_window']}_to_close",
    f"volume_zscore_{FEATURE_PARAMS['volume_window']}",
)

# Leading rows that are NaN; row t >= WARMUP is finite and depends on bars
# t - WARMUP .. t only. The longest lookback is the 50-bar SMA (bars t-49..t);
# log_return_20 and volatility_20 need bar t-20, ATR and RSI bar t-14.
WARMUP: int = max(
    max(FEATURE_PARAMS["sma_windows"]) - 1,
    max(FEATURE_PARAMS["return_lags"]),
    FEATURE_PARAMS["volatility_window"],
    FEATURE_PARAMS["rsi_window"],
    FEATURE_PARAMS["atr_window"],
    FEATURE_PARAMS["volume_window"] - 1,
)

_OHLCV = ("open", "high", "low", "close", "volume")


def feature_spec_hash() -> str:
    """sha256 of the feature names and parameters, recorded with every model."""
    spec = {"names": list(FEATURE_NAMES), "params": FEATURE_PARAMS}
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def price_arrays(bars: Any, fields: tuple[str, ...] = _OHLCV) -> dict[str, np.ndarray]:
    """Columns ``fields`` of one symbol's bars as float64 arrays.

    ``bars`` is a bar frame (columns ``open`` .. ``volume`` as in the bar
    schema; the capitalised ``Open`` .. ``Volume`` of backtesting.py and most
    vendors are accepted too) or any mapping of names to arrays. A frame
    holding several symbols is refused: mixing them would silently compute
    returns across symbol boundaries.
    """
    if isinstance(bars, pd.DataFrame) and "symbol" in bars.columns:
        if bars["symbol"].nunique(dropna=False) > 1:
            raise ValueError("bars hold several symbols; pass one symbol's bars at a time")
    if isinstance(bars, pd.DataFrame) and "ts" in bars.columns and len(bars) > 1:
        if not bars["ts"].is_monotonic_increasing:
            raise ValueError("bars must be in time order (ts increasing)")
    if not isinstance(bars, (pd.DataFrame, Mapping)):
        raise TypeError(f"bars must be a DataFrame or a mapping of arrays, not {type(bars).__name__}")
    out = {}
    for name in fields:
        for key in (name, name.capitalize()):
            if key in bars:
                out[name] = np.asarray(bars[key], dtype=np.float64)
                break
        else:
            raise KeyError(f"bars have no column {name!r} (nor {name.capitalize()!r})")
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    return out


def _window_view(x: np.ndarray, n: int) -> np.ndarray:
    """[T - n + 1, n] view of the length-n windows ending at bars n-1 .. T-1."""
    return np.lib.stride_tricks.sliding_window_view(x, n, axis=-1)


def _pad_front(values: np.ndarray, total: int) -> np.ndarray:
    out = np.full(values.shape[:-1] + (total,), np.nan)
    out[..., total - values.shape[-1]:] = values
    return out


def rolling_mean(x: np.ndarray, n: int) -> np.ndarray:
    """Mean of the last ``n`` values at each bar, each window summed afresh.

    NaN for the first ``n - 1`` bars. Bit-identical for a given window
    whatever came before it (see the module docstring).
    """
    x = np.asarray(x, dtype=np.float64)
    if n < 1:
        raise ValueError(f"window must be >= 1, got {n}")
    if x.shape[-1] < n:
        return np.full(x.shape, np.nan)
    return _pad_front(_window_view(x, n).mean(axis=-1), x.shape[-1])


def rolling_std(x: np.ndarray, n: int) -> np.ndarray:
    """Sample standard deviation (ddof=1) of the last ``n`` values, per window."""
    x = np.asarray(x, dtype=np.float64)
    if n < 2:
        raise ValueError(f"window must be >= 2, got {n}")
    if x.shape[-1] < n:
        return np.full(x.shape, np.nan)
    return _pad_front(_window_view(x, n).std(axis=-1, ddof=1), x.shape[-1])


@njit(cache=True, inline="always")
def _rolling_mean_step(values, i, n, state):
    """One bar of pandas' fixed-window ``roll_mean`` for window ``n``: (new state, the mean or NaN).

    ``state`` is (sum, add compensation, remove compensation, count,
    negatives, run of equal values, previous value). The same operations in
    the same order as pandas: a Kahan-compensated running sum (separate
    compensations for adding and removing), divided by the count, with
    pandas' rules that a window of one repeated value returns that value
    exactly and that an all-positive (all-negative) window never averages
    below (above) zero.
    """
    sum_x, comp_add, comp_remove, nobs, neg_ct, same_run, prev_value = state
    if n == 1:
        # Every window starts after the previous one ended: pandas starts afresh.
        sum_x = 0.0
        comp_add = 0.0
        comp_remove = 0.0
        nobs = 0
        neg_ct = 0
        same_run = 0
        prev_value = values[i]
    elif i >= n:
        val = values[i - n]
        nobs -= 1
        y = -val - comp_remove
        t = sum_x + y
        comp_remove = t - sum_x - y
        sum_x = t
        if math.copysign(1.0, val) < 0.0:
            neg_ct -= 1
    val = values[i]
    nobs += 1
    y = val - comp_add
    t = sum_x + y
    comp_add = t - sum_x - y
    sum_x = t
    if math.copysign(1.0, val) < 0.0:
        neg_ct += 1
    if val == prev_value:
        same_run += 1
    else:
        same_run = 1
    prev_value = val
    result = np.nan
    if nobs >= n:
        result = sum_x / nobs
        if same_run >= nobs:
            result = prev_value
        elif neg_ct == 0 and result < 0.0:
            result = 0.0
        elif neg_ct == nobs and result > 0.0:
            result = 0.0
    return (sum_x, comp_add, comp_remove, nobs, neg_ct, same_run, prev_value), result


@njit(cache=True)
def _rolling_means_4(values, n0, n1, n2, n3, row0, row1, row2, row3):
    """Four windows advanced together through the bars (``_rolling_mean_step``).

    Each window's running sum is one long chain of dependent additions;
    four independent chains keep the core busy where one would leave it
    waiting on each addition.
    """
    first = values[0] if values.shape[0] > 0 else 0.0
    s0 = (0.0, 0.0, 0.0, 0, 0, 0, first)
    s1 = s0
    s2 = s0
    s3 = s0
    for i in range(values.shape[0]):
        s0, x0 = _rolling_mean_step(values, i, n0, s0)
        s1, x1 = _rolling_mean_step(values, i, n1, s1)
        s2, x2 = _rolling_mean_step(values, i, n2, s2)
        s3, x3 = _rolling_mean_step(values, i, n3, s3)
        row0[i] = x0
        row1[i] = x1
        row2[i] = x2
        row3[i] = x3


@njit(cache=True, parallel=True)
def _pandas_rolling_means(values, windows, out):
    """pandas' ``Series.rolling(n).mean()`` for each n in ``windows``, bit for bit (``_rolling_mean_step``),
    four windows at a time. ``values`` must be finite; the caller checks."""
    W = windows.shape[0]
    for g in prange((W + 3) // 4):
        # A short last group repeats its last window (computing that row twice).
        w0 = 4 * g
        w1 = min(w0 + 1, W - 1)
        w2 = min(w0 + 2, W - 1)
        w3 = min(w0 + 3, W - 1)
        _rolling_means_4(values, windows[w0], windows[w1], windows[w2], windows[w3], out[w0], out[w1], out[w2],
                         out[w3])


def sma_table(close: np.ndarray, windows, method: str = "window") -> np.ndarray:
    """``sma(close, n, method)`` for every n in ``windows``, as a [len(windows), T] array."""
    close = np.asarray(close, dtype=np.float64)
    windows = np.asarray(windows, dtype=np.int64).ravel()
    if np.any(windows < 1):
        raise ValueError("SMA windows must be >= 1")
    if method == "rolling" and close.shape[0] > 0 and np.all(np.isfinite(close)):
        out = np.empty((windows.shape[0], close.shape[0]))
        _pandas_rolling_means(np.ascontiguousarray(close), windows, out)
        return out
    if method not in ("window", "rolling"):
        raise ValueError(f"method must be 'window' or 'rolling', got {method!r}")
    return np.stack([sma(close, int(n), method) for n in windows]) if len(windows) else np.empty((0, close.shape[0]))


def sma(close: np.ndarray, n: int, method: str = "window") -> np.ndarray:
    """Simple moving average of ``close`` over ``n`` bars; NaN for the first n-1.

    ``method`` says how the average is summed, because the two ways differ in
    the last bits and a crossover strategy can flip on the last bit:

    - ``"window"``: each window summed afresh (:func:`rolling_mean`); a bar's
      value does not depend on how much history came before it, so a live
      window and a full backtest agree exactly. The default.
    - ``"rolling"``: pandas ``Series.rolling(n).mean()``, a running sum; this
      is exactly what backtesting.py's ``SMA`` helper computes, used to compare
      against it. For finite input it runs compiled (``sma_table``), tested
      bit-identical to pandas.
    """
    close = np.asarray(close, dtype=np.float64)
    if n < 1:
        raise ValueError(f"window must be >= 1, got {n}")
    if method == "window":
        return rolling_mean(close, n)
    if method == "rolling":
        if close.shape[0] > 0 and np.all(np.isfinite(close)):
            return sma_table(close, [n], "rolling")[0]
        return pd.Series(close).rolling(n).mean().to_numpy()
    raise ValueError(f"method must be 'window' or 'rolling', got {method!r}")


def rsi(close: np.ndarray, n: int = 14) -> np.ndarray:
    """Relative strength index in [0, 100] over the last ``n`` price changes.

    Cutler's form: simple means of gains and losses over the window (finite
    memory, see the module docstring). A window with no change at all reads 50.
    NaN for the first ``n`` bars.
    """
    close = np.asarray(close, dtype=np.float64)
    change = np.diff(close, prepend=np.nan)
    gain = rolling_mean(np.where(change > 0, change, 0.0), n)
    loss = rolling_mean(np.where(change < 0, -change, 0.0), n)
    # The first window contains the NaN change of bar 0; keep it NaN.
    gain[: n] = np.nan
    loss[: n] = np.nan
    total = gain + loss
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, 100.0 * gain / total, 50.0)
    out[np.isnan(total)] = np.nan
    return out


def true_range(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> np.ndarray:
    """High-low range widened to include the previous close; NaN at bar 0."""
    close = np.asarray(close, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    low = np.asarray(low, dtype=np.float64)
    prev_close = np.concatenate(([np.nan], close[:-1]))
    out = np.maximum(high - low, np.maximum(np.abs(high - prev_close), np.abs(low - prev_close)))
    out[:1] = np.nan
    return out


def atr(high: np.ndarray, low: np.ndarray, close: np.ndarray, n: int = 14) -> np.ndarray:
    """Average true range: simple mean of the last ``n`` true ranges; NaN for the first n bars."""
    return rolling_mean(true_range(high, low, close), n)


def compute_features(bars: Any) -> np.ndarray:
    """Feature matrix ``[T, len(FEATURE_NAMES)]`` (float32) for one symbol's bars.

    Rows ``< WARMUP`` are NaN; every later row is finite (given positive
    prices). Row ``t`` uses bars ``t - WARMUP .. t`` only.
    """
    p = price_arrays(bars)
    close, volume = p["close"], p["volume"]
    if np.any(close <= 0) or not np.all(np.isfinite(close)):
        raise ValueError("close prices must be finite and positive")
    T = close.shape[0]
    log_close = np.log(close)
    cols = []
    for k in FEATURE_PARAMS["return_lags"]:
        lagged = np.full(T, np.nan)
        lagged[k:] = log_close[k:] - log_close[:-k]
        cols.append(lagged)
    one_bar = np.concatenate(([np.nan], np.diff(log_close)))
    cols.append(rolling_std(one_bar, FEATURE_PARAMS["volatility_window"]))
    for n in FEATURE_PARAMS["sma_windows"]:
        cols.append(close / rolling_mean(close, n) - 1.0)
    # RSI as a fraction so every feature is O(1) for the learners.
    cols.append(rsi(close, FEATURE_PARAMS["rsi_window"]) / 100.0)
    cols.append(atr(p["high"], p["low"], close, FEATURE_PARAMS["atr_window"]) / close)
    m = FEATURE_PARAMS["volume_window"]
    vol_mean = rolling_mean(volume, m)
    vol_std = rolling_std(volume, m) if T >= m else np.full(T, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A window of constant volume has no spread; its z-score is 0, not inf.
        z = np.where(vol_std > 0, (volume - vol_mean) / vol_std, 0.0)
    z[np.isnan(vol_mean)] = np.nan
    cols.append(z)
    out = np.stack(cols, axis=1).astype(np.float32)
    out[:WARMUP] = np.nan
    return out


def window(features: np.ndarray, n: int) -> np.ndarray:
    """The last ``n`` rows of ``features``, refusing rows still in warm-up.

    A model fed a NaN row would output garbage that looks like a decision;
    failing loudly here is what lets the ensemble skip the member instead.
    """
    features = np.asarray(features)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if features.shape[0] < n:
        raise ValueError(f"need {n} feature rows, have {features.shape[0]}")
    out = features[-n:]
    if not np.all(np.isfinite(out)):
        raise ValueError(f"the last {n} feature rows are not all finite (still in warm-up, need > {WARMUP} bars)")
    return out
