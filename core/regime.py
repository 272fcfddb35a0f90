"""Which market regime each feature row is in: trending, ranging or volatile.

The ensemble weighs its members differently per regime (a crossover earns its
keep in a trend, a mean-reversion rule in a range), so the regime is read
from the same feature rows the members see, by two numbers a person can check
by hand:

- ``volatility``: the standard deviation of one-bar log returns over the
  volatility window (feature ``volatility_20``). At or above
  ``vol_high`` the row is *volatile*, whatever the trend.
- ``trend``: the t-statistic of the move over the return window,
  ``|log_return_20| / (volatility_20 * sqrt(20))``: how many standard
  deviations of a 20-bar random walk the last 20 bars moved. At or above
  ``trend_min`` the row is *trending*; otherwise *ranging*.

Rows that are not finite (still in warm-up) are *unknown*; the fusion uses
base weights for them.

Not here: the weights per regime (``core.fusion``), or any estimate of the
regime's persistence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

TRENDING, RANGING, VOLATILE, UNKNOWN = "trending", "ranging", "volatile", "unknown"
REGIMES = (TRENDING, RANGING, VOLATILE)

VOL_FEATURE = "volatility_20"
RETURN_FEATURE = "log_return_20"
RETURN_BARS = 20


@dataclass(frozen=True)
class RegimeThresholds:
    # One-bar volatility (log-return std) at which a market counts as volatile.
    # 0.008 per bar sits between the synthetic market's calm regimes (0.003 and
    # 0.004) and its volatile one (0.012); for daily bars of equities ~0.02.
    vol_high: float = 0.008
    # Standard deviations of a 20-bar random walk that a 20-bar move must
    # exceed to be a trend rather than noise.
    trend_min: float = 1.5


def regime_scores(features: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(volatility, trend t-statistic) per row of ``features [B, F]``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [rows, features], got shape {x.shape}")
    names = list(names)
    try:
        vol = x[:, names.index(VOL_FEATURE)]
        ret = x[:, names.index(RETURN_FEATURE)]
    except ValueError:
        raise ValueError(f"regime detection needs features {VOL_FEATURE!r} and {RETURN_FEATURE!r}") from None
    with np.errstate(invalid="ignore", divide="ignore"):
        trend = np.where(vol > 0, np.abs(ret) / (vol * np.sqrt(RETURN_BARS)), np.where(ret != 0, np.inf, 0.0))
    trend[~np.isfinite(vol) | ~np.isfinite(ret)] = np.nan
    return vol, trend


def detect_regime(
    features: np.ndarray, names: Sequence[str], thresholds: RegimeThresholds = RegimeThresholds()
) -> np.ndarray:
    """Regime label per row of ``features [B, F]`` (object array of str)."""
    vol, trend = regime_scores(features, names)
    out = np.full(vol.shape[0], RANGING, dtype=object)
    with np.errstate(invalid="ignore"):
        out[trend >= thresholds.trend_min] = TRENDING
        out[vol >= thresholds.vol_high] = VOLATILE
    out[~np.isfinite(vol) | np.isnan(trend)] = UNKNOWN
    return out
