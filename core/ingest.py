"""Reading a user's OHLCV file (CSV or Parquet) into validated bars.

Column names are matched case-insensitively with the usual aliases
(``Date``/``Datetime``/``timestamp``/``t``, ``Open``/``o``, ``Vol``...), the
time column is parsed (naive times are taken as UTC), and every row is
validated. A file with any bad row is refused whole, with the row numbers and
reasons, so an import never leaves half a file in the store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.bars import Rejection, normalise, validate_bars

ALIASES = {
    "ts": ("ts", "timestamp", "datetime", "date", "time", "t", "date_time", "datetime_utc"),
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c", "last", "price"),
    "volume": ("volume", "vol", "v"),
}


class ImportRefused(ValueError):
    """The file cannot be imported; ``str()`` says what to fix."""

    def __init__(self, message: str, rejections: list[Rejection] | None = None):
        super().__init__(message)
        self.rejections = rejections or []


def read_bars_file(path: str | Path, symbol: str, source: str = "import") -> pd.DataFrame:
    """Read and validate; raise ``ImportRefused`` with reasons, or return bars."""
    p = Path(path)
    if not p.exists():
        raise ImportRefused(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            raw = pd.read_parquet(p)
        elif suffix in (".csv", ".txt", ".gz"):
            raw = pd.read_csv(p)
        else:
            raise ImportRefused(f"{p}: unknown file type {suffix!r}; give a .csv or .parquet file")
    except ImportRefused:
        raise
    except Exception as e:  # noqa: BLE001 - any parser error is the file's fault
        raise ImportRefused(f"{p}: cannot be read as {suffix.lstrip('.')}: {str(e).splitlines()[0]}") from None
    if raw.index.name and raw.index.name.lower() in ALIASES["ts"]:
        raw = raw.reset_index()
    lower = {str(c).strip().lower(): c for c in raw.columns}
    picked: dict[str, str] = {}
    for field, names in ALIASES.items():
        for n in names:
            if n in lower:
                picked[field] = lower[n]
                break
    missing = [f for f in ALIASES if f not in picked]
    if missing:
        raise ImportRefused(
            f"{p}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, raw.columns))}. "
            "Name them date/open/high/low/close/volume (any case)"
        )
    df = pd.DataFrame({f: raw[c] for f, c in picked.items()})
    ts = pd.to_datetime(df["ts"], errors="coerce", utc=True, format="mixed")
    df["ts"] = ts
    df["symbol"] = symbol.upper()
    df["source"] = source
    df["seq"] = np.arange(len(df), dtype=np.int64)
    for c in ("open", "high", "low", "close", "volume"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    bars = normalise(df)
    good, rejects = validate_bars(bars)
    if rejects:
        shown = "; ".join(str(r) for r in rejects[:5])
        more = f" and {len(rejects) - 5} more" if len(rejects) > 5 else ""
        raise ImportRefused(f"{p}: {len(rejects)} bad row(s), nothing written: {shown}{more}", rejects)
    if len(good) == 0:
        raise ImportRefused(f"{p}: no rows")
    return good
