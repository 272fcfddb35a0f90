"""The paper broker: fills known to the cent, brackets, idempotency, analytics, and a restart mid-stream.

Costs in these tests: 5 bps slippage, 0.005 per share with a 1.00 minimum.
The test plays the risk manager by signing orders with the broker's key.
"""

from __future__ import annotations

import pytest

from core.risk import VerdictTokenError, sign_order

KEY = b"k" * 32


def bar(ts, o, h=None, lo=None, c=None, sym="AAPL"):
    c = o if c is None else c
    return {"symbol": sym, "ts": ts, "open": o, "high": h if h is not None else max(o, c),
            "low": lo if lo is not None else min(o, c), "close": c}


def signed(cid, side, qty, sym="AAPL", account="p", **kw):
    order = {"client_order_id": cid, "account": account, "symbol": sym, "side": side, "qty": float(qty), **kw}
    return order, sign_order(KEY, order, 60)


@pytest.fixture
def settings(make_settings, tmp_path):
    return make_settings(broker={"ledger_dir": str(tmp_path / "ledgers"), "slippage_bps": 5,
                                 "commission_per_share": 0.005, "commission_min": 1.0},
                         accounts={"p": {}})


@pytest.fixture
def paper(settings):
    from actors.broker import PaperAccount

    return PaperAccount("p", settings, KEY)


def test_market_orders_fill_at_the_next_open_to_the_cent(paper):
    paper.on_bars([bar(1, 187.00)])
    paper.place(*signed("b1", "BUY", 300))
    assert paper.on_bars([bar(1, 187.00)]) == {"bars": 0, "fills": 0}  # a bar already seen does not fill it
    # 187.43 * 1.0005 = 187.5237 -> 187.52; commission max(1.00, 300 * 0.005 = 1.50) = 1.50
    assert paper.on_bars([bar(2, 187.43, c=188.00)]) == {"bars": 1, "fills": 1}
    b1 = paper.order("b1")
    assert (b1["status"], b1["fill_price"], b1["commission"], b1["fill_ts"]) == ("filled", 187.52, 1.50, 2)
    acct = paper.account()
    assert acct["cash"] == 100_000 - 300 * 187.52 - 1.50 == 43_742.50
    assert acct["equity"] == 43_742.50 + 300 * 188.00 == 100_142.50
    assert paper.positions()[0] | {"members": {}} == {
        "symbol": "AAPL", "qty": 300.0, "avg_price": 187.52, "price": 188.0, "market_value": 56_400.0,
        "unrealized_pnl": 144.0, "members": {}}
    paper.place(*signed("s1", "SELL", 300))
    # 190.10 * 0.9995 = 190.00495 -> 190.00; P&L 300 * (190.00 - 187.52) - 1.50 - 1.50 = 741.00
    paper.on_bars([bar(3, 190.10)])
    acct = paper.account()
    assert acct["cash"] == acct["equity"] == 100_741.00
    assert acct["realized_pnl"] == 741.00 and acct["commissions"] == 3.00 and paper.positions() == []


def test_bracket_stop_fills_at_the_gap_and_cancels_the_target(paper):
    paper.on_bars([bar(1, 100.0)])
    paper.place(*signed("br", "BUY", 100, stop_loss=95.0, take_profit=110.0))
    paper.on_bars([bar(2, 100.0, 100.5, 94.0, 96.0)])  # entry at 100.05; legs live only from the next bar
    assert paper.order("br-sl")["status"] == "pending" and paper.order("br")["fill_price"] == 100.05
    # gaps down through the stop: fills at the open 93.00 less 5 bps = 92.9535 -> 92.95
    paper.on_bars([bar(3, 93.0, 111.0, 92.0, 93.5)])
    assert paper.order("br-sl")["fill_price"] == 92.95
    assert paper.order("br-tp")["status"] == "canceled"  # one bar touched both: the stop won, OCO
    # (92.95 - 100.05) * 100 - 1.00 - 1.00 = -712.00
    assert paper.account()["realized_pnl"] == -712.00 and paper.positions() == []


def test_take_profit_short_and_analytics_by_symbol_and_member(paper):
    paper.on_bars([bar(1, 100.0), bar(1, 50.0, sym="MSFT")])
    paper.place(*signed("l", "BUY", 10, take_profit=105.0, members={"sma": 0.6, "ppo": 0.4}))
    paper.place(*signed("s", "SELL", 20, sym="MSFT", members={"rsi": 1.0}))
    paper.on_bars([bar(2, 100.0), bar(2, 50.0, sym="MSFT")])
    paper.on_bars([bar(3, 104.0, 106.0, 103.0, 105.5), bar(3, 52.0, sym="MSFT")])  # TP fills at 105.00
    paper.place(*signed("c", "BUY", 20, sym="MSFT"))
    paper.on_bars([bar(4, 53.0, sym="MSFT")])
    # long: 10 * (105.00 - 100.05) - 1 - 1 = 47.50; short: 20 * (49.98 - 53.03) - 1 - 1 = -63.00
    a = paper.analytics(1)
    assert (a["trades"], a["wins"], a["losses"], a["win_rate"]) == (2, 1, 1, 0.5)
    assert (a["avg_win"], a["avg_loss"], a["total_pnl"]) == (47.50, -63.00, -15.50)
    assert a["pnl_by_symbol"] == {"AAPL": 47.50, "MSFT": -63.00}
    assert a["pnl_by_member"] == {"ppo": 19.00, "rsi": -63.00, "sma": 28.50}  # 47.50 split 3:2
    assert paper.account()["cash"] == 100_000 - 15.50


def test_idempotent_by_client_order_id_and_only_signed_orders(paper):
    paper.on_bars([bar(1, 100.0)])
    order, tok = signed("same", "BUY", 5)
    first = paper.place(order, tok)
    assert paper.place(order, tok) == first and len(paper.orders(10)) == 1
    with pytest.raises(VerdictTokenError, match="only from the risk manager"):
        paper.place(signed("x", "BUY", 5)[0], "")
    with pytest.raises(VerdictTokenError, match="does not match"):
        paper.place({**order, "qty": 500.0}, tok)
    with pytest.raises(VerdictTokenError, match="sent to"):
        paper.place(*signed("y", "BUY", 5, account="other"))
    paper.on_bars([bar(2, 100.0)])
    paper.on_bars([bar(2, 100.0), bar(3, 101.0)])  # the repeated bar 2 fills nothing twice
    assert paper.positions()[0]["qty"] == 5 and len(paper.ledger.fills()) == 1
    assert paper.ledger.journal_mode() == "wal"


def test_restart_mid_stream_loses_nothing_and_doubles_nothing(ray_session, settings, tmp_path):
    """Kill the broker actor (Ray restarts it) while bars and orders stream in, replaying some bars;
    it must end exactly where an uninterrupted broker fed the same stream ends."""
    import ray

    from actors.broker import PaperAccount, PaperBroker
    from cluster.runtime import actor_options

    prices = [100.0, 101.0, 99.5, 102.25, 103.0, 98.75, 97.5, 100.5, 104.0, 105.5, 101.25, 99.0]
    bars = [bar(i + 1, p, p + 1.0, p - 1.0, p + 0.25) for i, p in enumerate(prices)]
    orders = {1: signed("o1", "BUY", 40), 3: signed("o2", "BUY", 25, stop_loss=95.0, take_profit=104.5),
              5: signed("o3", "SELL", 30), 8: signed("o4", "SELL", 35), 10: signed("o5", "BUY", 10)}

    ref_settings = settings.model_copy(update={"broker": settings.broker.model_copy(
        update={"ledger_dir": str(tmp_path / "reference")})})
    ref = PaperAccount("p", ref_settings, KEY)
    for i, b in enumerate(bars):
        ref.on_bars([b])
        if i in orders:
            ref.place(*orders[i])

    broker = PaperBroker.options(**actor_options("broker", settings, "broker:p-restart", detached=False)).remote(
        "p", settings, KEY)
    try:
        for i, b in enumerate(bars):
            ray.get(broker.on_bars.remote(bars[max(0, i - 2): i + 1]))  # replays the two bars before
            if i in orders:
                ray.get(broker.place.remote(*orders[i]))
                ray.get(broker.place.remote(*orders[i]))  # a caller's retry
            if i in (2, 6, 9):
                ray.kill(broker, no_restart=False)
        got, want = ray.get(broker.account.remote()), ref.account()
        assert got == want and want["realized_pnl"] != 0
        assert ray.get(broker.positions.remote()) == ref.positions()
        strip = lambda os: [(o["client_order_id"], o["status"], o["fill_price"], o["fill_ts"]) for o in os]
        assert strip(ray.get(broker.orders.remote(100))) == strip(ref.orders(100))
        assert ray.get(broker.health.remote())["journal_mode"] == "wal"
    finally:
        ray.kill(broker, no_restart=True)
