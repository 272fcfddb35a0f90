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
from typing import Any, Sequence

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


@njit(cache=True, inline="always")
def _window_sum(row, start, n):
    """``row[start] + row[start + 1] + ... `` over n values, left to right (no reordering)."""
    s = 0.0
    for j in range(n):
        s += row[start + j]
    return s


@njit(cache=True)
def _window_stats(x, n, std, out):
    """Per row of ``x`` [R, T]: each length-n window's mean (or, with ``std``, sample standard
    deviation) at its last bar; NaN before the first full window.

    Each window is summed afresh, left to right, so a window's value depends
    on its n values alone. Four neighbouring windows are summed side by
    side: four independent chains of additions keep the core busy where one
    would wait on each addition (each chain keeps its own order).
    """
    R, T = x.shape
    for r in range(R):
        row = x[r]
        o = out[r]
        o[:min(n - 1, T)] = np.nan
        t = n - 1
        while t + 3 < T:
            start = t - n + 1
            s0 = s1 = s2 = s3 = 0.0
            for j in range(n):
                s0 += row[start + j]
                s1 += row[start + j + 1]
                s2 += row[start + j + 2]
                s3 += row[start + j + 3]
            m0, m1, m2, m3 = s0 / n, s1 / n, s2 / n, s3 / n
            if std:
                q0 = q1 = q2 = q3 = 0.0
                for j in range(n):
                    d0 = row[start + j] - m0
                    d1 = row[start + j + 1] - m1
                    d2 = row[start + j + 2] - m2
                    d3 = row[start + j + 3] - m3
                    q0 += d0 * d0
                    q1 += d1 * d1
                    q2 += d2 * d2
                    q3 += d3 * d3
                m0, m1 = np.sqrt(q0 / (n - 1)), np.sqrt(q1 / (n - 1))
                m2, m3 = np.sqrt(q2 / (n - 1)), np.sqrt(q3 / (n - 1))
            o[t], o[t + 1], o[t + 2], o[t + 3] = m0, m1, m2, m3
            t += 4
        while t < T:
            start = t - n + 1
            m = _window_sum(row, start, n) / n
            if std:
                q = 0.0
                for j in range(n):
                    d = row[start + j] - m
                    q += d * d
                m = np.sqrt(q / (n - 1))
            o[t] = m
            t += 1


def _rolling(x: np.ndarray, n: int, std: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape)
    if x.size:
        T = x.shape[-1]
        _window_stats(np.ascontiguousarray(x).reshape(-1, T), n, std, out.reshape(-1, T))
    return out


def rolling_mean(x: np.ndarray, n: int) -> np.ndarray:
    """Mean of the last ``n`` values at each bar (along the last axis), each window summed afresh.

    NaN for the first ``n - 1`` bars. Bit-identical for a given window
    whatever came before it (see the module docstring): each window is
    summed left to right, then divided by n.
    """
    if n < 1:
        raise ValueError(f"window must be >= 1, got {n}")
    return _rolling(x, n, False)


def rolling_std(x: np.ndarray, n: int) -> np.ndarray:
    """Sample standard deviation (ddof=1) of the last ``n`` values, per window (two passes over it)."""
    if n < 2:
        raise ValueError(f"window must be >= 2, got {n}")
    return _rolling(x, n, True)


@njit(cache=True, inline="always")
def _kahan_roll(values, i, n, s, comp_add, comp_remove):
    """One bar of pandas' fixed-window running sum: drop ``values[i - n]``, add ``values[i]``.

    Kahan-compensated, with separate compensations for adding and
    removing, in pandas' order (``roll_mean``'s remove_mean, then add_mean).
    """
    if i >= n:
        y = -values[i - n] - comp_remove
        t = s + y
        comp_remove = t - s - y
        s = t
    y = values[i] - comp_add
    t = s + y
    comp_add = t - s - y
    return t, comp_add, comp_remove


@njit(cache=True)
def _running_sums_8(values, n0, n1, n2, n3, n4, n5, n6, n7, r0, r1, r2, r3, r4, r5, r6, r7):
    """pandas' running sums for eight windows, advanced together through the bars.

    Each window's sum is a chain of dependent additions; eight independent
    chains keep the core busy where one would leave it waiting. Only the
    sums: their state is three doubles per window, so all eight stay in
    registers, and what pandas does with them is ``_finish_means``'s job.
    """
    s0 = a0 = c0 = s1 = a1 = c1 = s2 = a2 = c2 = s3 = a3 = c3 = 0.0
    s4 = a4 = c4 = s5 = a5 = c5 = s6 = a6 = c6 = s7 = a7 = c7 = 0.0
    for i in range(values.shape[0]):
        s0, a0, c0 = _kahan_roll(values, i, n0, s0, a0, c0)
        s1, a1, c1 = _kahan_roll(values, i, n1, s1, a1, c1)
        s2, a2, c2 = _kahan_roll(values, i, n2, s2, a2, c2)
        s3, a3, c3 = _kahan_roll(values, i, n3, s3, a3, c3)
        s4, a4, c4 = _kahan_roll(values, i, n4, s4, a4, c4)
        s5, a5, c5 = _kahan_roll(values, i, n5, s5, a5, c5)
        s6, a6, c6 = _kahan_roll(values, i, n6, s6, a6, c6)
        s7, a7, c7 = _kahan_roll(values, i, n7, s7, a7, c7)
        r0[i] = s0
        r1[i] = s1
        r2[i] = s2
        r3[i] = s3
        r4[i] = s4
        r5[i] = s5
        r6[i] = s6
        r7[i] = s7


@njit(cache=True, error_model="numpy")
def _finish_means(row, values, n, same_run, negatives):
    """Turn a row of pandas running sums (``_running_sums_8``) into pandas' means, in place.

    pandas divides the sum by the count (n, once the window is full; NaN
    before), returns the value itself when the window holds one value
    repeated (``same_run[i]``: equal values ending at bar i), and keeps an
    all-positive (all-negative) window's mean from falling below (above)
    zero (``negatives``: running count of values with the sign bit set).
    Window 1 is the values themselves, by the repeated-value rule. Every
    bar is independent here, so this pass vectorises, divisions included.
    """
    T = row.shape[0]
    row[:min(n - 1, T)] = np.nan
    # Slices from 0 so the compiler sees non-negative indices (and vectorises).
    full = row[n - 1:]
    current = values[n - 1:]
    runs = same_run[n - 1:]
    neg_through = negatives[n:]
    neg_before = negatives[:T - n + 1]
    count = float(n)
    for j in range(full.shape[0]):
        mean = full[j] / count
        neg = neg_through[j] - neg_before[j]
        if (neg == 0 and mean < 0.0) or (neg == n and mean > 0.0):
            mean = 0.0
        full[j] = current[j] if runs[j] >= n else mean


@njit(cache=True, parallel=True)
def _pandas_rolling_means(values, windows, out):
    """pandas' ``Series.rolling(n).mean()`` for each n in ``windows``, bit for bit.

    Running sums eight windows at a time (``_running_sums_8``), then each
    row finished on its own (``_finish_means``). ``values`` must be finite;
    the caller checks.
    """
    T = values.shape[0]
    W = windows.shape[0]
    same_run = np.empty(T, dtype=np.int64)
    negatives = np.empty(T + 1, dtype=np.int64)
    run = 0
    negatives[0] = 0
    for i in range(T):
        run = run + 1 if i > 0 and values[i] == values[i - 1] else 1
        same_run[i] = run
        negatives[i + 1] = negatives[i] + (math.copysign(1.0, values[i]) < 0.0)
    for g in prange((W + 7) // 8):
        # A short last group repeats its last window (summing that row again).
        w = 8 * g
        last = W - 1
        _running_sums_8(values, windows[w], windows[min(w + 1, last)], windows[min(w + 2, last)],
                        windows[min(w + 3, last)], windows[min(w + 4, last)], windows[min(w + 5, last)],
                        windows[min(w + 6, last)], windows[min(w + 7, last)], out[w], out[min(w + 1, last)],
                        out[min(w + 2, last)], out[min(w + 3, last)], out[min(w + 4, last)], out[min(w + 5, last)],
                        out[min(w + 6, last)], out[min(w + 7, last)])
        for k in range(w, min(w + 8, W)):
            _finish_means(out[k], values, windows[k], same_run, negatives)


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
    gain[..., :n] = np.nan
    loss[..., :n] = np.nan
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
    prev_close = np.concatenate((np.full(close.shape[:-1] + (1,), np.nan), close[..., :-1]), axis=-1)
    out = np.maximum(high - low, np.maximum(np.abs(high - prev_close), np.abs(low - prev_close)))
    out[..., :1] = np.nan
    return out


def atr(high: np.ndarray, low: np.ndarray, close: np.ndarray, n: int = 14) -> np.ndarray:
    """Average true range: simple mean of the last ``n`` true ranges; NaN for the first n bars."""
    return rolling_mean(true_range(high, low, close), n)


def compute_features(bars: Any) -> np.ndarray:
    """Feature matrix ``[T, len(FEATURE_NAMES)]`` (float32) for one symbol's bars.

    Rows ``< WARMUP`` are NaN; every later row is finite (given positive
    prices). Row ``t`` uses bars ``t - WARMUP .. t`` only.
    """
    return _features(price_arrays(bars))


def latest_features(bars: Sequence[Any], rows: int) -> np.ndarray:
    """``compute_features(b)[-rows:]`` for every ``b`` in ``bars``, as one ``[B, rows, F]`` array.

    The batch's features in one pass of numpy calls instead of one pass per
    symbol: each symbol's last ``WARMUP + rows`` bars (all that its last
    ``rows`` feature rows read, by finite memory) are stacked into
    ``[B, WARMUP + rows]`` arrays. Bit-identical to the per-symbol rows
    (tested). Every symbol needs at least ``WARMUP + rows`` bars.
    """
    n = WARMUP + rows
    cols: dict[str, list[np.ndarray]] = {k: [] for k in _OHLCV}
    for b in bars:
        p = price_arrays(b)
        if p["close"].shape[0] < n:
            raise ValueError(f"need {n} bars for {rows} feature rows, got {p['close'].shape[0]}")
        for k in _OHLCV:
            cols[k].append(p[k][-n:])
    if not bars:
        return np.empty((0, rows, len(FEATURE_NAMES)), np.float32)
    return _features({k: np.stack(v) for k, v in cols.items()})[:, -rows:]


def _features(p: Mapping[str, np.ndarray]) -> np.ndarray:
    """Features of OHLCV arrays ``[..., T]`` (float64): ``[..., T, F]`` float32, along the last axis only."""
    close, volume = p["close"], p["volume"]
    if np.any(close <= 0) or not np.all(np.isfinite(close)):
        raise ValueError("close prices must be finite and positive")
    T = close.shape[-1]
    log_close = np.log(close)
    cols = []
    for k in FEATURE_PARAMS["return_lags"]:
        lagged = np.full(close.shape, np.nan)
        lagged[..., k:] = log_close[..., k:] - log_close[..., :-k]
        cols.append(lagged)
    one_bar = np.concatenate((np.full(close.shape[:-1] + (1,), np.nan), np.diff(log_close, axis=-1)), axis=-1)
    cols.append(rolling_std(one_bar, FEATURE_PARAMS["volatility_window"]))
    for n in FEATURE_PARAMS["sma_windows"]:
        cols.append(close / rolling_mean(close, n) - 1.0)
    # RSI as a fraction so every feature is O(1) for the learners.
    cols.append(rsi(close, FEATURE_PARAMS["rsi_window"]) / 100.0)
    cols.append(atr(p["high"], p["low"], close, FEATURE_PARAMS["atr_window"]) / close)
    m = FEATURE_PARAMS["volume_window"]
    vol_mean = rolling_mean(volume, m)
    vol_std = rolling_std(volume, m) if T >= m else np.full(volume.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A window of constant volume has no spread; its z-score is 0, not inf.
        z = np.where(vol_std > 0, (volume - vol_mean) / vol_std, 0.0)
    z[np.isnan(vol_mean)] = np.nan
    cols.append(z)
    out = np.stack(cols, axis=-1).astype(np.float32)
    out[..., :WARMUP, :] = np.nan
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
