"""The bar: raytrade's one record of market data, its Arrow schema and its validation.

Every bar that enters the system (a feed, an import, the synthetic market)
passes ``validate_bars`` first. Validation never drops a row silently: each
rejected row comes back with its position and the reason, so a feed can count
bad bars against its source and an import can tell the user what to fix.

Not here: spike filtering across sources and failover (the feed router), or
storage (``core.store``).
"""

from __future__ import annotations

from dataclasses import dataclass

from math import inf as _INF, isfinite as _isfinite

import numpy as np
import pandas as pd
import pyarrow as pa

PRICE_COLUMNS = ("open", "high", "low", "close")
COLUMNS = ("symbol", "ts", "open", "high", "low", "close", "volume", "source", "seq")

BAR_SCHEMA = pa.schema(
    [
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("ns", tz="UTC"), nullable=False),
        pa.field("open", pa.float64(), nullable=False),
        pa.field("high", pa.float64(), nullable=False),
        pa.field("low", pa.float64(), nullable=False),
        pa.field("close", pa.float64(), nullable=False),
        pa.field("volume", pa.float64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
    ]
)

# Reasons, as users and metrics see them.
NON_FINITE_PRICE = "non-finite price"
NON_POSITIVE_PRICE = "non-positive price"
HIGH_BELOW = "high below open/close"
LOW_ABOVE = "low above open/close"
NEGATIVE_VOLUME = "negative volume"
NON_FINITE_VOLUME = "non-finite volume"
TS_NOT_INCREASING = "ts not increasing"
DUPLICATE_TS = "duplicate ts"
MISSING_TS = "missing ts"
MISSING_SYMBOL = "missing symbol"


@dataclass(frozen=True)
class Rejection:
    row: int  # 0-based position in the input
    symbol: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row + 1} ({self.symbol}): {self.reason}"


def empty_bars() -> pd.DataFrame:
    return BAR_SCHEMA.empty_table().to_pandas()


def normalise(df: pd.DataFrame, source: str | None = None, symbol: str | None = None) -> pd.DataFrame:
    """Coerce a frame to the bar columns and dtypes (no validation)."""
    out = df.copy()
    if symbol is not None:
        out["symbol"] = symbol
    if source is not None or "source" not in out:
        out["source"] = source or "unknown"
    if "seq" not in out:
        out["seq"] = np.arange(len(out), dtype=np.int64)
    missing = [c for c in COLUMNS if c not in out]
    if missing:
        raise ValueError(f"bars are missing columns: {', '.join(missing)}")
    out = out[list(COLUMNS)]
    out["symbol"] = out["symbol"].astype(str).str.upper()
    out["ts"] = pd.to_datetime(out["ts"], utc=True).astype("datetime64[ns, UTC]")
    for c in (*PRICE_COLUMNS, "volume"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("float64")
    out["source"] = out["source"].astype(str)
    out["seq"] = out["seq"].astype("int64")
    return out.reset_index(drop=True)


def validate_bars(
    df: pd.DataFrame, last_ts: dict[str, pd.Timestamp] | None = None
) -> tuple[pd.DataFrame, list[Rejection]]:
    """Split ``df`` into the rows that are valid bars and the rejected ones with reasons.

    ``last_ts`` gives, per symbol, the time of the last bar already accepted
    (from the store or a stream), so a bar at or before it is rejected too.
    The first failing check names the reason; checks run in the order of the
    schema's rules. The input order is kept and is the order ``ts`` must
    increase in, per symbol.
    """
    n = len(df)
    if n == 0:
        return df.copy(), []
    o, h, lo, c = (df[k].to_numpy(dtype="float64") for k in PRICE_COLUMNS)
    v = df["volume"].to_numpy(dtype="float64")
    prices = np.stack([o, h, lo, c])
    reason = np.full(n, None, dtype=object)

    def mark(mask: np.ndarray, why: str) -> None:
        sel = mask & (reason == None)  # noqa: E711 - elementwise on object array
        reason[sel] = why

    ts = pd.to_datetime(df["ts"], utc=True, errors="coerce")
    syms = df["symbol"].astype(str).to_numpy()
    mark(df["symbol"].isna().to_numpy() | (syms == "") | (syms == "nan"), MISSING_SYMBOL)
    mark(ts.isna().to_numpy(), MISSING_TS)
    mark(~np.isfinite(prices).all(axis=0), NON_FINITE_PRICE)
    with np.errstate(invalid="ignore"):
        mark((prices <= 0).any(axis=0), NON_POSITIVE_PRICE)
        mark(h < np.maximum(o, c), HIGH_BELOW)
        mark(lo > np.minimum(o, c), LOW_ABOVE)
    mark(~np.isfinite(v), NON_FINITE_VOLUME)
    with np.errstate(invalid="ignore"):
        mark(v < 0, NEGATIVE_VOLUME)

    # Time order per symbol, against the last *accepted* bar, so one bad bar
    # does not cause its good successors to be rejected.
    last: dict[str, int] = {k.upper(): _ns(t) for k, t in (last_ts or {}).items()}
    ts_ns = ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]").view("int64")
    for i in range(n):
        if reason[i] is not None:
            continue
        s, t = syms[i], int(ts_ns[i])
        prev = last.get(s)
        if prev is not None:
            if t == prev:
                reason[i] = DUPLICATE_TS
                continue
            if t < prev:
                reason[i] = TS_NOT_INCREASING
                continue
        last[s] = t

    ok = reason == None  # noqa: E711
    rejects = [Rejection(int(i), str(syms[i]), str(reason[i])) for i in np.flatnonzero(~ok)]
    return df.loc[ok].reset_index(drop=True), rejects


def first_bad_row(df: pd.DataFrame) -> tuple[int, str] | None:
    """The first row (0-based) of stored bars that breaks the bar rules, with the reason; None if all hold.

    The same rules and reasons as ``validate_bars``, for bars that were
    accepted once and are read back (one symbol's part of the store): every
    row must hold, so this answers only "which is the first bad one" and is
    vectorised (``validate_bars`` walks the rows in Python to keep its good
    rows, far too slow for a read of a few hundred thousand bars).
    """
    n = len(df)
    if n == 0:
        return None
    o, h, lo, c = (df[k].to_numpy(dtype="float64") for k in PRICE_COLUMNS)
    v = df["volume"].to_numpy(dtype="float64")
    syms = df["symbol"]
    ts = pd.to_datetime(df["ts"], utc=True, errors="coerce")
    missing_ts = ts.isna().to_numpy()
    ts_ns = ts.to_numpy("datetime64[ns]").view("int64")  # UTC instants
    step = np.ones(n, dtype=np.int64)  # > 0: the first row has nothing before it
    with np.errstate(over="ignore"):
        step[1:] = np.diff(ts_ns)
    step[1:][missing_ts[:-1]] = 1  # after a missing ts (already a bad row) there is no order to judge
    no_symbol = (syms.isna() | (syms == "")).to_numpy(dtype=bool)
    with np.errstate(invalid="ignore"):
        # The good bar in one chain, as in bar_problem: NaN fails every comparison, infinity ``< inf``.
        good = (0.0 < lo) & (lo <= o) & (o <= h) & (h < np.inf) & (lo <= c) & (c <= h) & (0.0 <= v) & (v < np.inf)
    good &= (step > 0) & ~missing_ts & ~no_symbol
    if good.all():
        return None
    row = int(np.argmin(good))
    # The reason, in the order of validate_bars's checks, for that one row.
    prices = [float(x[row]) for x in (o, h, lo, c)]
    o1, h1, l1, c1 = prices
    checks = (
        (bool(no_symbol[row]), MISSING_SYMBOL),
        (bool(missing_ts[row]), MISSING_TS),
        (not all(np.isfinite(prices)), NON_FINITE_PRICE),
        (min(prices) <= 0, NON_POSITIVE_PRICE),
        (h1 < max(o1, c1), HIGH_BELOW),
        (l1 > min(o1, c1), LOW_ABOVE),
        (not np.isfinite(v[row]), NON_FINITE_VOLUME),
        (v[row] < 0, NEGATIVE_VOLUME),
        (step[row] == 0, DUPLICATE_TS),
    )
    return row, next((why for failed, why in checks if failed), TS_NOT_INCREASING)


def bar_problem(rec: dict, prev_ts_ns: int | None = None) -> str | None:
    """The reason one bar (a dict, ts in ns) fails validation, or None.

    The same rules, in the same order, as ``validate_bars``; this scalar form is
    for the feed router's hot path, where bars arrive a few at a time.
    """
    if not rec.get("symbol"):
        return MISSING_SYMBOL
    ts = rec.get("ts")
    if ts is None:
        return MISSING_TS
    try:
        o, h, lo, c = float(rec["open"]), float(rec["high"]), float(rec["low"]), float(rec["close"])
        v = float(rec["volume"])
    except (KeyError, TypeError, ValueError):
        return NON_FINITE_PRICE
    # The common, good bar in one chained comparison: it holds exactly when none
    # of the price and volume rules below fires (NaN fails every comparison,
    # infinity fails ``< inf``), and when it fails they decide as before.
    if 0.0 < lo <= o <= h < _INF and lo <= c <= h and 0.0 <= v < _INF:
        pass
    elif not (_isfinite(o) and _isfinite(h) and _isfinite(lo) and _isfinite(c)):
        return NON_FINITE_PRICE
    elif o <= 0 or h <= 0 or lo <= 0 or c <= 0:
        return NON_POSITIVE_PRICE
    elif h < o or h < c:
        return HIGH_BELOW
    elif lo > o or lo > c:
        return LOW_ABOVE
    elif not _isfinite(v):
        return NON_FINITE_VOLUME
    elif v < 0:
        return NEGATIVE_VOLUME
    if prev_ts_ns is not None:
        t = int(ts)
        if t == prev_ts_ns:
            return DUPLICATE_TS
        if t < prev_ts_ns:
            return TS_NOT_INCREASING
    return None


def _ns(t: object) -> int:
    ts = pd.Timestamp(t)
    return int((ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")).value)


def to_table(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(normalise(df), schema=BAR_SCHEMA, preserve_index=False)


def from_table(table: pa.Table) -> pd.DataFrame:
    df = table.select(list(COLUMNS)).cast(BAR_SCHEMA).to_pandas()
    return df.reset_index(drop=True)
