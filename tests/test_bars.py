"""Bar validation: each kind of bad row is rejected with its reason; good data round-trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from core import bars as B
from core.bars import BAR_SCHEMA, from_table, to_table, validate_bars
from core.synthetic import generate_bars


def _bars(rows):
    base = {"symbol": "SPY", "volume": 100.0, "source": "t", "seq": 0}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df["ts"] = pd.to_datetime(df["ts"], utc=True)
    return df


def good(ts, o=10.0, h=11.0, lo=9.0, c=10.5, **kw):
    return {"ts": ts, "open": o, "high": h, "low": lo, "close": c, **kw}


@pytest.mark.parametrize(
    "bad, reason",
    [
        (good("2024-01-01 00:01", c=np.nan), B.NON_FINITE_PRICE),
        (good("2024-01-01 00:01", h=np.inf), B.NON_FINITE_PRICE),
        (good("2024-01-01 00:01", o=0.0, lo=0.0), B.NON_POSITIVE_PRICE),
        (good("2024-01-01 00:01", lo=-1.0), B.NON_POSITIVE_PRICE),
        (good("2024-01-01 00:01", h=10.2), B.HIGH_BELOW),  # close 10.5 above high
        (good("2024-01-01 00:01", lo=10.2), B.LOW_ABOVE),  # open 10 below low
        (good("2024-01-01 00:01", volume=-5.0), B.NEGATIVE_VOLUME),
        (good("2024-01-01 00:01", volume=np.nan), B.NON_FINITE_VOLUME),
        (good("2024-01-01 00:00"), B.DUPLICATE_TS),
        (good("2023-12-31 23:59"), B.TS_NOT_INCREASING),
    ],
)
def test_each_bad_row_rejected_with_reason(bad, reason):
    df = _bars([good("2024-01-01 00:00"), bad, good("2024-01-01 00:02")])
    ok, rejects = validate_bars(df)
    assert [(r.row, r.reason) for r in rejects] == [(1, reason)]
    # The bad row does not poison the good one after it.
    assert list(ok["ts"].dt.minute) == [0, 2]


def test_order_is_per_symbol():
    df = _bars([good("2024-01-01 00:01"), good("2024-01-01 00:00", symbol="QQQ"), good("2024-01-01 00:02")])
    ok, rejects = validate_bars(df)
    assert rejects == [] and len(ok) == 3


def test_against_last_accepted_ts():
    df = _bars([good("2024-01-01 00:00"), good("2024-01-01 00:05")])
    ok, rejects = validate_bars(df, last_ts={"SPY": pd.Timestamp("2024-01-01 00:00", tz="UTC")})
    assert [r.reason for r in rejects] == [B.DUPLICATE_TS] and len(ok) == 1


def test_rejection_message_names_row_and_reason():
    df = _bars([good("2024-01-01 00:00", volume=-1.0)])
    _, rejects = validate_bars(df)
    assert str(rejects[0]) == "row 1 (SPY): negative volume"


def test_good_file_round_trips_exactly(tmp_path):
    df = generate_bars(["SPY", "QQQ"], 300, seed=11)
    ok, rejects = validate_bars(df)
    assert rejects == [] and len(ok) == 600
    path = tmp_path / "bars.parquet"
    pq.write_table(to_table(df), path)
    table = pq.read_table(path)
    assert table.schema.equals(BAR_SCHEMA)
    back = from_table(table)
    pd.testing.assert_frame_equal(back, B.normalise(df), check_dtype=False)
    assert (back[["open", "high", "low", "close", "volume"]].to_numpy() == df[["open", "high", "low", "close", "volume"]].to_numpy()).all()
    assert (back["ts"].to_numpy() == df["ts"].to_numpy()).all()


def test_scalar_check_agrees_with_validate_bars():
    from core.bars import bar_problem

    cases = [good("2024-01-01 00:01", c=np.nan), good("2024-01-01 00:01", o=0.0, lo=0.0),
             good("2024-01-01 00:01", h=10.2), good("2024-01-01 00:01", lo=10.2),
             good("2024-01-01 00:01", volume=-5.0), good("2024-01-01 00:01", volume=np.inf),
             good("2024-01-01 00:00"), good("2023-12-31 23:59"), good("2024-01-01 00:01")]
    for case in cases:
        df = _bars([good("2024-01-01 00:00"), case])
        _, rejects = validate_bars(df)
        want = rejects[0].reason if rejects else None
        rec = {**df.iloc[1].to_dict(), "ts": int(df["ts"].iloc[1].value)}
        assert bar_problem(rec, int(df["ts"].iloc[0].value)) == want
