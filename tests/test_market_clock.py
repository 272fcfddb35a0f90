"""The risk day follows the bars' exchange sessions (core.market_clock), not the wall clock (issue 19)."""

from __future__ import annotations

import pandas as pd
import pytest

from core.market_clock import trading_day


def _ns(text: str) -> int:
    return pd.Timestamp(text, tz="UTC").value


@pytest.mark.parametrize("utc, day", [
    ("2024-01-02 14:31", "2024-01-02"),  # 09:31 in New York: the session of the 2nd
    ("2024-01-02 23:59", "2024-01-02"),  # after the close
    ("2024-01-03 00:30", "2024-01-02"),  # past UTC midnight, still the evening of the 2nd in New York
    ("2024-01-03 14:30", "2024-01-03"),  # the next open: a new day
    ("2024-01-06 12:00", "2024-01-05"),  # Saturday counts for Friday's session
    ("2024-01-15 15:00", "2024-01-12"),  # Martin Luther King Day: no session, so Friday's
    ("2024-07-03 17:30", "2024-07-03"),  # an early close (13:00 New York): after it, the same day
])
def test_trading_day_by_the_new_york_calendar(utc, day):
    assert trading_day(_ns(utc), "XNYS") == day


def test_always_open_markets_and_edges():
    assert trading_day(_ns("2024-01-03 00:30"), "24/7") == "2024-01-03"
    assert trading_day(_ns("1990-05-01 12:00"), "XNYS") == "1990-05-01"  # before the calendar: its UTC date
    with pytest.raises(ValueError, match="market calendar 'XNOPE' is not known"):
        trading_day(_ns("2024-01-02 15:00"), "XNOPE")


def _bar(ts, price, sym="AAPL"):
    return {"symbol": sym, "ts": _ns(ts), "open": price, "high": price, "low": price, "close": price}


def test_a_replayed_session_boundary_resets_the_days_loss_and_utc_midnight_does_not(ray_session, make_settings,
                                                                                      tmp_path):
    import ray

    from actors.risk import open_account

    s = make_settings(
        broker={"ledger_dir": str(tmp_path / "ledgers"), "slippage_bps": 0, "commission_per_share": 0,
                "commission_min": 0},
        accounts={"day": {"risk": {"max_position_pct": 0.5, "max_risk_per_trade_pct": 0.5}}},
    )
    risk, broker = open_account(s, "day", detached=False)
    try:
        ray.get(broker.on_bars.remote([_bar("2024-01-02 15:00", 100.0)]))
        base = {"account": "day", "symbol": "AAPL", "confidence": 0.9, "price": 100.0, "stop_loss": 50.0,
                "take_profit": 200.0}
        st = ray.get(risk.state.remote())
        assert st["day"] == "2024-01-02" and st["day_start_equity"] == 100_000  # the bars' day, not today's
        assert ray.get(risk.submit.remote({**base, "side": "BUY", "quantity": 400, "decision_id": "d1"}))["order"]
        ray.get(broker.on_bars.remote([_bar("2024-01-02 15:01", 100.0), _bar("2024-01-02 15:02", 94.5)]))
        assert ray.get(risk.state.remote())["daily_halt"]  # -2200 on 100,000: past the 2 % limit
        # Past UTC midnight but still the 2nd's evening in New York: the same day, still halted.
        ray.get(broker.on_bars.remote([_bar("2024-01-03 00:30", 94.5)]))
        st = ray.get(risk.state.remote())
        assert st["day"] == "2024-01-02" and st["daily_halt"]
        # The next session opens: a new day, its loss counted from that day's first equity.
        ray.get(broker.on_bars.remote([_bar("2024-01-03 14:31", 94.5)]))
        st = ray.get(risk.state.remote())
        assert st["day"] == "2024-01-03" and not st["daily_halt"] and st["day_start_equity"] == 97_800
        assert ray.get(risk.evaluate.remote({**base, "side": "BUY", "quantity": 1, "price": 94.5,
                                             "stop_loss": 47.0, "take_profit": 190.0, "decision_id": "d2"}))["approved"]
    finally:
        ray.kill(risk, no_restart=True)
        ray.kill(broker, no_restart=True)
