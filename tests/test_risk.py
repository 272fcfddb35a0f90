"""Risk limits by hand: each limit refuses what it should, with its reason; sizing worked out on paper.

The pure tests judge orders with ``core.risk.evaluate``; the actor test runs a
RiskManager over a paper broker on Ray: the kill switch holding until an admin
resumes, halts letting exits through, idempotent submits, and a broker that
refuses orders the risk manager did not sign.
"""

from __future__ import annotations

import math

import pytest

from core.risk import (Book, OrderRequest, OrderRequestError, VerdictTokenError, book_from_snapshot, evaluate, sign_order,
                       verify_order)
from core.risk_limits import RiskLimits

LIMITS = RiskLimits()  # 5 % position, 1 % risk/trade, 2:1, conf 0.7, 2 % day, 5 % drawdown, stop = 2 ATR


def req(**kw):
    base = dict(account="a", symbol="AAPL", side="BUY", target_position=1.0, confidence=0.8, price=100.0,
                atr=10.0, decision_id="d-1")
    base.update(kw)
    return OrderRequest.from_dict(base)


def refused(v, check, text):
    assert not v["approved"] and v["quantity"] == 0
    assert not v["checks"][check]["ok"], v["checks"]
    assert any(text in r for r in v["reasons"]), v["reasons"]


# -- sizing ------------------------------------------------------------------------------------
def test_sizing_by_risk_per_trade_by_hand():
    # m = 1.0 * 0.8; d = 2 * 10 = 20; budget = 100000 * 1 % * 0.8 = 800 -> 40 shares; cap = 5000/100 = 50
    v = evaluate(LIMITS, req(), Book(equity=100_000))
    assert v["approved"] and v["quantity"] == 40
    assert (v["stop_loss"], v["take_profit"]) == (80.0, 140.0)  # 2 ATR stop, 2:1 target
    assert v["sizing"]["binding"] == "max risk per trade" and v["sizing"]["risk_budget"] == 800.0
    assert v["reasons"] == ["approved: BUY 40 AAPL; sized by max risk per trade (multiplier 0.80)"]


def test_a_bracket_in_cents_still_meets_the_reward_risk_it_was_set_for():
    """Price 262.40, ATR 0.6685: 2 ATR is 1.337. The stop rounds toward the price, to 261.07 (a
    distance of 1.33, the one sized on); the target rounds away, 262.40 + 2 x 1.33 = 265.06. Rounded
    to the nearest cent instead (261.06 and 265.07 on a 1.337 distance) the target was 1.997 distances
    away and the risk manager refused the bracket it had set itself."""
    v = evaluate(LIMITS, req(price=262.40, atr=0.6685), Book(equity=100_000))
    assert (v["stop_loss"], v["take_profit"]) == (261.07, 265.06)
    assert v["approved"] and v["checks"]["reward_risk"]["ok"], v["reasons"]
    assert v["sizing"]["stop_distance"] == pytest.approx(1.33)
    short = evaluate(LIMITS, req(side="SELL", target_position=-1.0, price=262.40, atr=0.6685), Book(equity=100_000))
    assert (short["stop_loss"], short["take_profit"]) == (263.73, 259.74) and short["approved"], short["reasons"]


def test_a_refusal_never_prints_the_limit_as_the_value():
    v = evaluate(LIMITS, req(confidence=0.6999), Book(equity=100_000))
    assert "confidence 0.6999 is below the threshold 0.70" in v["reasons"][0], v["reasons"]
    v = evaluate(LIMITS, req(stop_loss=95.0, take_profit=109.99), Book(equity=100_000))
    assert any("reward:risk 1.998 is below the minimum 2.00" in r for r in v["reasons"]), v["reasons"]


def test_sizing_by_position_cap_and_by_target_fraction():
    # d = 4 -> q_risk = 800 / 4 = 200 > cap 50 -> 50
    assert evaluate(LIMITS, req(atr=2.0), Book(equity=100_000))["quantity"] == 50
    # half the target: m = 0.5 * 0.8 = 0.4 -> budget 400 / d 20 = 20
    assert evaluate(LIMITS, req(target_position=0.5), Book(equity=100_000))["quantity"] == 20
    # already long 15: the order is the difference, 40 - 15 = 25
    v = evaluate(LIMITS, req(), Book(equity=100_000, position=15))
    assert v["approved"] and v["quantity"] == 25 and v["position_after"] == 40
    # a short target sizes the same way, stop above
    v = evaluate(LIMITS, req(side="SELL", target_position=-1.0), Book(equity=100_000))
    assert v["approved"] and v["quantity"] == 40 and (v["stop_loss"], v["take_profit"]) == (120.0, 60.0)
    # an explicit stop wins over the ATR: d = 100 - 96 = 4 -> 200 -> cap 50
    assert evaluate(LIMITS, req(stop_loss=96.0), Book(equity=100_000))["quantity"] == 50


def test_exit_to_flat_sells_the_whole_position_even_under_every_halt():
    book = Book(equity=90_000, position=30, day_start_equity=100_000, peak_equity=100_000,
                halted="maintenance (by ops)", kill_switch="drawdown 10%")
    v = evaluate(LIMITS, req(side="SELL", target_position=0.0, confidence=0.0, symbol="AAPL"), book)
    assert v["approved"] and v["quantity"] == 30 and not v["entry"]
    assert v["checks"]["kill_switch"]["skipped"].startswith("exit")


# -- every limit refuses with its reason ---------------------------------------------------------
def test_allowed_symbols():
    refused(evaluate(LIMITS, req(symbol="TSLA"), Book(equity=100_000)), "allowed_symbol", "TSLA is not an allowed symbol")


def test_confidence_threshold():
    refused(evaluate(LIMITS, req(confidence=0.69), Book(equity=100_000)), "confidence",
            "confidence 0.69 is below the threshold 0.70")
    assert evaluate(LIMITS, req(confidence=0.7), Book(equity=100_000))["approved"]


def test_max_position_size_explicit_and_per_symbol_override():
    # 51 * 100 = 5100 > 5 % of 100000
    refused(evaluate(LIMITS, req(quantity=51, stop_loss=99.0, take_profit=102.0), Book(equity=100_000)),
            "max_position", "exceeds 5.00% of equity (5000.00)")
    assert evaluate(LIMITS, req(quantity=50, stop_loss=99.0, take_profit=102.0), Book(equity=100_000))["approved"]
    tight = RiskLimits(max_position_pct_by_symbol={"AAPL": 0.01})
    refused(evaluate(tight, req(quantity=11, stop_loss=99.0, take_profit=102.0), Book(equity=100_000)),
            "max_position", "exceeds 1.00% of equity (1000.00)")
    # sized: already at the cap, nothing more to buy
    v = evaluate(LIMITS, req(atr=2.0), Book(equity=100_000, position=50))
    assert not v["approved"] and "already at the target 50 (max position size)" in v["reasons"][0]


def test_risk_per_trade_explicit_and_one_share_too_many():
    # 40 shares * (100 - 70) = 1200 > 1000
    refused(evaluate(LIMITS, req(quantity=40, stop_loss=70.0, take_profit=170.0), Book(equity=100_000)),
            "risk_per_trade", "risk to the stop 1200.00 exceeds 1.00% of equity (1000.00)")
    # d = 2 * 500 = 1000 per share > budget 800: sized to nothing, and says why
    refused(evaluate(LIMITS, req(price=2000.0, atr=500.0), Book(equity=100_000)), "risk_per_trade",
            "one share of AAPL risks 1000.00 to the stop, more than the budget 800.00")


def test_min_reward_risk():
    refused(evaluate(LIMITS, req(stop_loss=95.0, take_profit=105.0), Book(equity=100_000)), "reward_risk",
            "reward:risk 1.00 is below the minimum 2.00")
    refused(evaluate(LIMITS, req(stop_loss=105.0, take_profit=120.0), Book(equity=100_000)), "stop",
            "must lie either side of price")
    assert evaluate(LIMITS, req(stop_loss=95.0, take_profit=110.0), Book(equity=100_000))["approved"]


def test_daily_loss_halts_entries_not_exits():
    # day P&L -2100 on a 100000 start: past -2 %
    book = Book(equity=97_900, position=10, day_start_equity=100_000, peak_equity=100_000)
    refused(evaluate(LIMITS, req(), book), "daily_loss", "day P&L -2100.00 breached the daily loss limit 2.00%")
    exit_ = evaluate(LIMITS, req(side="SELL", target_position=0.0), book)
    assert exit_["approved"] and exit_["quantity"] == 10


def test_drawdown_kill_switch():
    book = Book(equity=94_900, day_start_equity=94_900, peak_equity=100_000)
    refused(evaluate(LIMITS, req(), book), "max_drawdown", "drawdown 5.10% reached the limit 5.00%: kill switch")
    latched = Book(equity=100_000, kill_switch="drawdown 5.10% from peak")
    refused(evaluate(LIMITS, req(), latched), "kill_switch", "kill switch on: drawdown 5.10% from peak; an admin must resume")


def test_every_reason_is_listed_not_just_the_first():
    v = evaluate(LIMITS, req(symbol="TSLA", confidence=0.1), Book(equity=100_000, halted="x (by y)"))
    assert {k for k, c in v["checks"].items() if not c["ok"]} == {"allowed_symbol", "confidence", "halt"}
    assert len(v["reasons"]) == 3


@pytest.mark.parametrize("bad, what", [
    ({"price": math.nan}, "price must be a finite number"),
    ({"price": -1.0}, "price must be > 0"),
    ({"confidence": 1.5}, "confidence must be in [0.0, 1.0]"),
    ({"side": "HOLD"}, "side must be BUY or SELL"),
    ({"target_position": "1"}, "target_position must be a number"),
    ({"quantity": 0}, "quantity must be > 0"),
    ({"decision_id": "a b"}, "decision_id must be"),
])
def test_bad_requests_say_what_to_fix(bad, what):
    with pytest.raises(OrderRequestError, match=None) as e:
        req(**bad)
    assert what in str(e.value)


def test_verdict_tokens_bind_the_exact_order():
    order = {"client_order_id": "d-1", "account": "a", "symbol": "AAPL", "side": "BUY", "qty": 40.0,
             "stop_loss": 80.0, "take_profit": 140.0}
    tok = sign_order(b"k" * 32, order, 30, now=1000.0)
    verify_order(b"k" * 32, order, tok, now=1010.0)
    for changed in ({"qty": 41.0}, {"symbol": "MSFT"}, {"side": "SELL"}, {"stop_loss": None}):
        with pytest.raises(VerdictTokenError, match="does not match"):
            verify_order(b"k" * 32, {**order, **changed}, tok, now=1010.0)
    with pytest.raises(VerdictTokenError, match="does not match"):
        verify_order(b"other-key", order, tok, now=1010.0)
    with pytest.raises(VerdictTokenError, match="expired"):
        verify_order(b"k" * 32, order, tok, now=1031.0)
    with pytest.raises(VerdictTokenError, match="only from the risk manager"):
        verify_order(b"k" * 32, order, None)


def test_account_overrides_of_limits(make_settings):
    s = make_settings(accounts={"default": {}, "tight": {"risk": {"max_position_pct": 0.01}}})
    assert s.risk_limits_for("tight").max_position_pct == 0.01
    assert s.risk_limits_for("default").max_position_pct == 0.05
    assert s.risk_limits_for("tight").confidence_threshold == 0.7  # the rest inherited


# -- the actor ---------------------------------------------------------------------------------
def _bar(ts, o, h=None, lo=None, c=None, sym="AAPL"):
    return {"symbol": sym, "ts": ts, "open": o, "high": h or max(o, c or o), "low": lo or min(o, c or o), "close": c or o}


def test_risk_manager_kill_switch_halt_idempotency_and_no_bypass(ray_session, make_settings, tmp_path):
    import ray

    from actors.risk import open_account

    s = make_settings(
        broker={"ledger_dir": str(tmp_path / "ledgers"), "slippage_bps": 0, "commission_per_share": 0,
                "commission_min": 0},
        accounts={"rk": {"risk": {"max_position_pct": 0.95, "max_risk_per_trade_pct": 0.5,
                                  "max_daily_loss_pct": 0.5, "max_drawdown_pct": 0.05}}},
    )
    risk, broker = open_account(s, "rk", detached=False)
    try:
        ray.get(broker.on_bars.remote([_bar(1, 100.0)]))

        def order(did, side="BUY", qty=1.0, **kw):
            return {"account": "rk", "symbol": "AAPL", "side": side, "quantity": qty, "confidence": 0.9,
                    "price": 100.0, "stop_loss": 50.0, "take_profit": 200.0, "decision_id": did,
                    "members": {"sma": 1.0}, **kw}

        def same_as_preview(o):
            """The ingress's preview (core.risk over the snapshot) judges as the risk manager does."""
            snap = ray.get(risk.snapshot.remote())
            mine = evaluate(s.risk_limits_for("rk"), OrderRequest.from_dict(o), book_from_snapshot(snap, o["symbol"]))
            theirs = ray.get(risk.evaluate.remote(o))
            assert {k: mine[k] for k in ("approved", "quantity", "reasons")} == \
                {k: theirs[k] for k in ("approved", "quantity", "reasons")}
            return theirs

        assert same_as_preview(order("p0"))["approved"]
        first = ray.get(risk.submit.remote(order("k1", qty=900)))
        assert first["verdict"]["approved"] and first["order"]["status"] == "pending", first
        again = ray.get(risk.submit.remote(order("k1", qty=900)))
        assert again["duplicate"] and again["order"]["client_order_id"] == "k1"
        assert [o["client_order_id"] for o in ray.get(broker.orders.remote(10))].count("k1") == 1

        # The broker refuses anything the risk manager did not sign, even a copy with a changed quantity.
        bypass = {"client_order_id": "sneaky", "account": "rk", "symbol": "AAPL", "side": "BUY", "qty": 5000.0}
        with pytest.raises(Exception, match="only from the risk manager"):
            ray.get(broker.place.remote(bypass, None))
        with pytest.raises(Exception, match="does not match"):
            ray.get(broker.place.remote({**bypass, "client_order_id": "k9"},
                                        sign_order(b"guess", bypass, 30)))

        ray.get(broker.on_bars.remote([_bar(2, 100.0)]))  # fills 900 @ 100.00
        ray.get(broker.on_bars.remote([_bar(3, 100.0, 100.0, 93.0, 94.0)]))  # equity 10000 + 900*94 = 94600
        st = ray.get(risk.state.remote())
        assert st["equity"] == 94_600 and st["drawdown"] == pytest.approx(0.054)
        assert st["kill_switch"] and not st["entries_allowed"] and "kill switch" in st["reasons"][0]

        blocked = ray.get(risk.submit.remote(order("k2")))
        assert not blocked["verdict"]["approved"] and blocked["order"] is None
        assert any("kill switch on" in r for r in blocked["verdict"]["reasons"])
        assert not same_as_preview(order("p1"))["approved"]  # the kill switch, in the snapshot too
        assert same_as_preview(order("p2", side="SELL", qty=100))["approved"]  # an exit
        sized = same_as_preview({**order("p3", side="SELL", qty=None), "target_position": 0.5, "atr": 2.0})
        assert sized["quantity"] > 0  # sized from the snapshot's position: 900 long, target smaller
        out = ray.get(risk.submit.remote(order("k3", side="SELL", qty=100)))  # an exit passes
        assert out["verdict"]["approved"] and not out["verdict"]["entry"]
        ray.get(broker.on_bars.remote([_bar(4, 95.0)]))  # recovers a little: still latched
        assert ray.get(risk.state.remote())["kill_switch"]
        assert not ray.get(risk.evaluate.remote(order("k4")))["approved"]
        # the same decision id is answered as it was the first time, even after the state changes
        assert not ray.get(risk.submit.remote(order("k2")))["verdict"]["approved"]

        st = ray.get(risk.resume.remote("admin"))
        assert not st["kill_switch"] and st["entries_allowed"]
        # The market is at 95 now (the broker's own mark): an entry priced at 100 is 5.26 % away and
        # refused (at most 5 %); at the market's price it passes.
        far = ray.get(risk.submit.remote(order("k4")))
        assert not far["verdict"]["approved"] and far["order"] is None
        assert any("5.26% from the account's last price of AAPL 95" in r for r in far["verdict"]["reasons"]), far
        assert ray.get(risk.submit.remote(order("k4b", price=95.0)))["verdict"]["approved"]

        ray.get(risk.halt.remote("maintenance", "ops"))
        assert "trading halted: maintenance (by ops)" in same_as_preview(order("p4", price=95.0))["reasons"]
        h = ray.get(risk.submit.remote(order("k5", price=95.0)))
        assert not h["verdict"]["approved"] and "trading halted: maintenance (by ops)" in h["verdict"]["reasons"]
        assert ray.get(risk.state.remote())["reasons"] == ["halted by ops: maintenance"]
        ray.get(risk.resume.remote("ops"))

        bad = ray.get(risk.submit.remote({**order("k6"), "price": float("inf")}))
        assert bad["verdict"]["error"] == "bad_request" and "price must be a finite number" in bad["error"]

        # the kill switch survives a restart of the risk manager
        ray.get(broker.on_bars.remote([_bar(5, 80.0)]))
        assert ray.get(risk.state.remote())["kill_switch"]
        ray.kill(risk, no_restart=False)
        assert ray.get(risk.state.remote())["kill_switch"]
    finally:
        ray.kill(risk, no_restart=True)
        ray.kill(broker, no_restart=True)


def test_daily_loss_halt_latches_for_the_day(ray_session, make_settings, tmp_path):
    import ray

    from actors.risk import open_account

    s = make_settings(
        broker={"ledger_dir": str(tmp_path / "ledgers"), "slippage_bps": 0, "commission_per_share": 0,
                "commission_min": 0},
        accounts={"day": {"risk": {"max_position_pct": 0.5, "max_risk_per_trade_pct": 0.5}}},
    )
    risk, broker = open_account(s, "day", detached=False)
    try:
        ray.get(broker.on_bars.remote([_bar(1, 100.0)]))
        base = {"account": "day", "symbol": "AAPL", "confidence": 0.9, "price": 100.0, "stop_loss": 50.0,
                "take_profit": 200.0}
        assert ray.get(risk.state.remote())["day_start_equity"] == 100_000
        assert ray.get(risk.submit.remote({**base, "side": "BUY", "quantity": 400, "decision_id": "e1"}))["order"]
        ray.get(broker.on_bars.remote([_bar(2, 100.0), _bar(3, 94.5)]))  # -2200: past 2 %, short of 5 %
        st = ray.get(risk.state.remote())
        assert st["daily_halt"] and not st["kill_switch"] and st["daily_pnl"] == -2200.0
        v = ray.get(risk.evaluate.remote({**base, "side": "BUY", "quantity": 1, "decision_id": "e2"}))
        assert not v["approved"] and any("no new entries today" in r for r in v["reasons"])
        ray.get(broker.on_bars.remote([_bar(4, 100.0)]))  # back to even: still halted for the day
        assert ray.get(risk.state.remote())["daily_halt"]
        ray.get(risk.resume.remote("admin"))  # resume does not lift the day's halt
        assert not ray.get(risk.evaluate.remote({**base, "side": "BUY", "quantity": 1, "decision_id": "e3"}))["approved"]
        ex = ray.get(risk.submit.remote({**base, "side": "SELL", "quantity": 400, "decision_id": "e4"}))
        assert ex["verdict"]["approved"] and ex["order"]["status"] == "pending"
    finally:
        ray.kill(risk, no_restart=True)
        ray.kill(broker, no_restart=True)
