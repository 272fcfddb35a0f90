"""A seeded synthetic market for the embedded default, tests and Monte Carlo.

Each symbol follows a log price driven by a hidden regime that switches as a
Markov chain: *trending* (drift, low noise), *ranging* (mean reversion to a
slowly moving anchor) and *volatile* (no drift, high noise, fat tails). Each bar
is built from ``substeps`` intrabar moves, so open/high/low/close are a real
path's extremes and always pass ``core.bars.validate_bars``.

The same (seed, symbol, start, interval) always gives the same bars, whether
produced in one ``generate`` call or bar by bar from ``SyntheticMarket.next``:
the live synthetic feed and the history written by ``raytrade data generate``
agree exactly.

Not a model of any real market: it exists so every part of raytrade can run
and be tested with no data and no network.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

REGIMES = ("trending", "ranging", "volatile")

# Per-bar parameters of each regime (log-return units).
_DRIFT = {"trending": 4e-4, "ranging": 0.0, "volatile": 0.0}
_VOL = {"trending": 0.004, "ranging": 0.003, "volatile": 0.012}
_REVERT = {"trending": 0.0, "ranging": 0.08, "volatile": 0.0}
# Probability of staying in the regime per bar (mean spell ~ 1/(1-p) bars).
_STAY = 0.99


@dataclass
class _SymbolState:
    rng: np.random.Generator
    log_price: float
    anchor: float
    regime: int
    trend_sign: float
    index: int = 0


class SyntheticMarket:
    """Bar-by-bar generator; ``next()`` gives one bar per symbol."""

    def __init__(
        self,
        symbols: list[str],
        seed: int = 7,
        start: str | pd.Timestamp = "2024-01-02 14:30",
        interval: str | pd.Timedelta = "1min",
        substeps: int = 8,
        start_price: float | None = None,
        source: str = "synthetic",
    ):
        self.symbols = [s.upper() for s in symbols]
        self.seed = int(seed)
        self.start = pd.Timestamp(start, tz="UTC") if pd.Timestamp(start).tz is None else pd.Timestamp(start).tz_convert("UTC")
        self.interval = pd.Timedelta(interval)
        self.substeps = int(substeps)
        self.source = source
        self._states: dict[str, _SymbolState] = {}
        for sym in self.symbols:
            # A per-symbol stream: adding a symbol does not change another's bars.
            rng = np.random.default_rng([self.seed, zlib.crc32(sym.encode())])
            p0 = start_price if start_price is not None else float(rng.uniform(20, 500))
            self._states[sym] = _SymbolState(
                rng=rng,
                log_price=float(np.log(p0)),
                anchor=float(np.log(p0)),
                regime=int(rng.integers(0, 3)),
                trend_sign=float(rng.choice([-1.0, 1.0])),
            )

    def regime_of(self, symbol: str) -> str:
        return REGIMES[self._states[symbol.upper()].regime]

    def _bar(self, sym: str) -> tuple[dict, str]:
        st = self._states[sym]
        rng = st.rng
        if rng.random() > _STAY:
            st.regime = int((st.regime + rng.integers(1, 3)) % 3)
            st.trend_sign = float(rng.choice([-1.0, 1.0]))
            st.anchor = st.log_price
        regime = REGIMES[st.regime]
        k = self.substeps
        sub_vol = _VOL[regime] / np.sqrt(k)
        if regime == "volatile":
            shocks = rng.standard_t(4, size=k) * sub_vol / np.sqrt(2.0)
        else:
            shocks = rng.standard_normal(k) * sub_vol
        path = np.empty(k + 1)
        path[0] = st.log_price + rng.standard_normal() * sub_vol * 0.25  # small opening gap
        for i in range(k):
            pull = -_REVERT[regime] / k * (path[i] - st.anchor)
            path[i + 1] = path[i] + st.trend_sign * _DRIFT[regime] / k + pull + shocks[i]
        st.anchor += 0.02 * (path[-1] - st.anchor)
        prices = np.exp(path)
        o, c = float(prices[0]), float(prices[-1])
        h, lo = float(prices.max()), float(prices.min())
        move = abs(path[-1] - path[0]) / max(_VOL[regime], 1e-9)
        volume = float(np.round(rng.lognormal(10.0, 0.4) * (1.0 + move)))
        ts = self.start + st.index * self.interval
        seq = st.index
        st.index += 1
        st.log_price = float(path[-1])
        return (
            {"symbol": sym, "ts": ts, "open": o, "high": h, "low": lo, "close": c, "volume": volume,
             "source": self.source, "seq": seq},
            regime,
        )

    def next(self) -> pd.DataFrame:
        """One bar for every symbol, at the next timestamp."""
        rows = [self._bar(s)[0] for s in self.symbols]
        return _frame(rows)

    def generate(self, n_bars: int, with_regime: bool = False) -> pd.DataFrame:
        """The next ``n_bars`` bars of every symbol, ordered by symbol then time."""
        rows, regimes = [], []
        for sym in self.symbols:
            for _ in range(n_bars):
                row, regime = self._bar(sym)
                rows.append(row)
                regimes.append(regime)
        df = _frame(rows)
        if with_regime:
            df["regime"] = regimes
        return df


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if len(df):
        df["ts"] = pd.to_datetime(df["ts"], utc=True).astype("datetime64[ns, UTC]")
        df["seq"] = df["seq"].astype("int64")
    return df


def generate_bars(symbols: list[str], n_bars: int, seed: int = 7, **kw) -> pd.DataFrame:
    """Convenience: ``n_bars`` bars per symbol from a fresh market."""
    return SyntheticMarket(symbols, seed=seed, **kw).generate(n_bars)
