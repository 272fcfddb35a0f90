"""The risk book: limits judged on filled plus working orders, exits that only reduce, legs that
never open a position, prices from the account's own marks.

Each sequence the outside test used to break the limits is here, worked out by hand, on
``core.risk.evaluate`` and the Ray-free paper broker (``actors.broker.PaperAccount``) composed as
the risk manager composes them; then a hypothesis state machine runs random sequences of orders,
bars, cancels, partial fills and leg triggers and checks the invariants after every step.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, settings as hsettings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from actors.broker import PaperAccount
from core.risk import (Book, OrderRequest, OrderRequestError, VerdictTokenError, book_from_snapshot, evaluate,
                       order_for, pending_by_symbol, sign_order)
from core.risk_limits import RiskLimits

KEY = b"r" * 32


def bar(ts, o, h=None, lo=None, c=None, sym="SPY"):
    c = o if c is None else c
    return {"symbol": sym, "ts": ts, "open": o, "high": h if h is not None else max(o, c),
            "low": lo if lo is not None else min(o, c), "close": c}


class Desk:
    """The risk manager's judge-then-place step without Ray: the same functions the actor calls."""

    def __init__(self, broker: PaperAccount, limits: RiskLimits, account: str = "p"):
        self.broker, self.limits, self.account = broker, limits, account
        self.kill_switch: str | None = None

    def snapshot(self) -> dict:
        book = self.broker.book()
        return {"equity": self.broker.account()["equity"], "positions": book["positions"],
                "pending": pending_by_symbol(book["working"], book["positions"]), "marks": book["marks"],
                "kill_switch": self.kill_switch}

    def submit(self, **kw) -> dict:
        req = OrderRequest.from_dict({"account": self.account, "confidence": 1.0, **kw})
        verdict = evaluate(self.limits, req, book_from_snapshot(self.snapshot(), req.symbol))
        if verdict["approved"]:
            order = order_for(req, verdict)
            self.broker.place(order, sign_order(KEY, order, 60))
        return verdict


@pytest.fixture
def desk(make_settings, tmp_path):
    s = make_settings(broker={"ledger_dir": str(tmp_path / "ledgers"), "slippage_bps": 0, "commission_per_share": 0,
                              "commission_min": 0, "starting_cash": 100_000},
                      accounts={"p": {}})
    d = Desk(PaperAccount("p", s, KEY), RiskLimits(allowed_symbols=["SPY", "AAPL"], confidence_threshold=0.0))
    d.broker.on_bars([bar(1, 250.0), bar(1, 250.0, sym="AAPL")])
    return d


def qty(desk, sym="SPY"):
    return desk.broker.ledger.position_qty(sym)


def test_stacked_orders_on_one_bar_count_against_the_cap(desk):
    """Cap 5 % of 100 000 = 5 000 = 20 AAPL at 250. Three orders of 18 on one bar (90 % each): the
    first passes; the second would make the book 36 (9 000), refused though nothing has filled."""
    first = desk.submit(symbol="AAPL", side="BUY", quantity=18, price=250.0, stop_loss=245.0, take_profit=300.0,
                        decision_id="s1")
    assert first["approved"] and first["position_after"] == 18
    for i in (2, 3):
        v = desk.submit(symbol="AAPL", side="BUY", quantity=18, price=250.0, stop_loss=245.0, take_profit=300.0,
                        decision_id=f"s{i}")
        assert not v["approved"], v
        assert "position 36 AAPL = 9000.00 exceeds 5.00% of equity (5000.00)" in v["reasons"], v["reasons"]
        assert v["filled_position"] == 0 and v["pending_position"] == 18
    desk.broker.on_bars([bar(2, 250.0, sym="AAPL")])
    assert qty(desk, "AAPL") == 18  # 18, not 54


def test_a_sized_order_is_sized_against_the_book_not_the_fills(desk):
    """Target 1.0 at confidence 1, ATR 5: d = 10, budget 1 000 -> 100 shares, cap 20 -> target 20. A
    second identical decision on the same bar finds the book at 20 already: nothing to buy."""
    kw = dict(symbol="SPY", side="BUY", target_position=1.0, price=250.0, atr=5.0)
    assert desk.submit(decision_id="t1", **kw)["quantity"] == 20
    again = desk.submit(decision_id="t2", **kw)
    assert not again["approved"] and "already at the target 20" in again["reasons"][0], again["reasons"]


def test_an_exit_is_sized_net_of_working_orders_and_never_flips(desk):
    """Filled 20 SPY, a working SELL 15: the book is 5. An exit to flat sells 5, not 20."""
    desk.submit(symbol="SPY", side="BUY", quantity=20, price=250.0, stop_loss=240.0, take_profit=280.0,
                decision_id="e0")
    desk.broker.on_bars([bar(2, 250.0)])
    assert qty(desk) == 20
    assert desk.submit(symbol="SPY", side="SELL", quantity=15, price=250.0, decision_id="e1")["approved"]
    flat = desk.submit(symbol="SPY", side="SELL", target_position=0.0, price=250.0, decision_id="e2")
    assert flat["approved"] and flat["quantity"] == 5 and not flat["entry"], flat
    # SELL 10 more would carry the book from 0 to -10: an entry (a short), not an exit.
    desk.kill_switch = "drawdown 6% from peak"
    v = desk.submit(symbol="SPY", side="SELL", quantity=10, price=250.0, decision_id="e3")
    assert not v["approved"] and v["entry"] and any("kill switch on" in r for r in v["reasons"])
    desk.broker.on_bars([bar(3, 250.0), bar(4, 250.0)])
    assert qty(desk) == 0


def test_exits_that_race_past_the_position_are_cut_when_they_fill(desk):
    """Ten exits each judged on a filled 10 (as under concurrent callers with a stale read) are booked
    reduce-only: the first fills 10, the others find nothing to reduce and are canceled."""
    desk.submit(symbol="SPY", side="BUY", quantity=10, price=250.0, stop_loss=240.0, take_profit=280.0,
                decision_id="r0")
    desk.broker.on_bars([bar(2, 250.0)])
    for i in range(10):
        req = OrderRequest.from_dict({"account": "p", "symbol": "SPY", "side": "SELL", "quantity": 10,
                                      "confidence": 1.0, "price": 250.0, "decision_id": f"race{i}"})
        v = evaluate(desk.limits, req, Book(equity=100_000, position=10, mark=250.0))  # the stale read
        assert v["approved"] and not v["entry"]
        o = order_for(req, v)
        desk.broker.place(o, sign_order(KEY, o, 60))
    desk.broker.on_bars([bar(3, 250.0)])
    assert qty(desk) == 0
    statuses = [desk.broker.order(f"race{i}")["status"] for i in range(10)]
    assert statuses == ["filled"] + ["canceled"] * 9
    assert desk.broker.order("race1")["reason"] == "reduce-only: no position left to reduce"


def test_bracket_legs_follow_the_position_they_protect(desk):
    """BUY 10, 1, 1, 1, 1 SPY, each with its bracket; then an exit SELL 14 closes the book. Every
    leg is canceled with the position, and a later bar through every take-profit fills nothing."""
    for i, q in enumerate([10, 1, 1, 1, 1]):
        assert desk.submit(symbol="SPY", side="BUY", quantity=q, price=250.0, stop_loss=245.0, take_profit=260.0,
                           decision_id=f"b{i}")["approved"]
    desk.broker.on_bars([bar(2, 250.0)])
    assert qty(desk) == 14
    live = [o for o in desk.broker.book()["working"] if o["parent"]]
    assert len(live) == 10 and sum(o["qty"] for o in live if o["type"] == "limit") == 14
    ex = desk.submit(symbol="SPY", side="SELL", quantity=14, price=250.0, decision_id="x1")
    assert ex["approved"] and not ex["entry"]
    desk.broker.on_bars([bar(3, 250.0), bar(4, 262.0, 265.0, 261.0, 264.0)])
    assert qty(desk) == 0
    assert [o for o in desk.broker.book()["working"] if o["parent"]] == []
    assert desk.broker.order("b0-tp")["reason"] == "the position it protected closed"


def test_a_partial_exit_cuts_the_legs_to_the_position(desk):
    """BUY 10 with a bracket, then an exit of 4: the legs shrink to 6, and the stop sells 6, not 10."""
    desk.submit(symbol="SPY", side="BUY", quantity=10, price=250.0, stop_loss=245.0, take_profit=260.0,
                decision_id="c0")
    desk.broker.on_bars([bar(2, 250.0)])
    desk.submit(symbol="SPY", side="SELL", quantity=4, price=250.0, decision_id="c1")
    desk.broker.on_bars([bar(3, 250.0)])
    assert qty(desk) == 6
    assert desk.broker.order("c0-sl")["qty"] == 6 and desk.broker.order("c0-tp")["qty"] == 6
    desk.broker.on_bars([bar(4, 244.0)])  # gaps through the stop
    assert qty(desk) == 0 and desk.broker.order("c0-tp")["status"] == "canceled"


def test_leg_ids_belong_to_the_broker(desk):
    """A client id in the leg namespace is refused with the reason; and one that names an existing
    order's leg can never be booked as an entry (entry X would lose its stop)."""
    with pytest.raises(OrderRequestError, match="ends in -sl or -tp, which name bracket legs"):
        desk.submit(symbol="SPY", side="BUY", quantity=1, price=250.0, stop_loss=245.0, take_profit=260.0,
                    decision_id="X-sl")
    # Past the risk manager's check (an order signed directly): the broker refuses the collision.
    plain = {"client_order_id": "Y-sl", "account": "p", "symbol": "SPY", "side": "BUY", "qty": 1.0}
    desk.broker.place(plain, sign_order(KEY, plain, 60))
    entry = {"client_order_id": "Y", "account": "p", "symbol": "SPY", "side": "BUY", "qty": 1.0,
             "stop_loss": 245.0, "take_profit": 260.0}
    with pytest.raises(VerdictTokenError, match="bracket leg ids are the broker's own"):
        desk.broker.place(entry, sign_order(KEY, entry, 60))


def test_a_callers_price_cannot_size_an_entry(desk):
    """Bars closing at 0.0399 would size 125 000 SPY under a 5 000 cap; the account's own mark is
    250, so the entry is refused for its price whatever else it says."""
    v = desk.submit(symbol="SPY", side="BUY", target_position=1.0, price=0.0399, atr=0.001, decision_id="cheap")
    assert not v["approved"] and v["quantity"] == 0
    assert any("is 99.98% from the account's last price of SPY 250" in r for r in v["reasons"]), v["reasons"]
    assert desk.broker.book()["working"] == []
    near = desk.submit(symbol="SPY", side="BUY", quantity=1, price=251.0, stop_loss=245.0, take_profit=270.0,
                       decision_id="near")
    assert near["approved"] and near["checks"]["price"]["ok"]


def test_a_fractional_quantity_is_refused_never_floored(desk):
    """1.7 shares on a whole-share account used to place 1; it is refused with what to send."""
    v = desk.submit(symbol="SPY", side="BUY", quantity=1.7, price=250.0, stop_loss=245.0, take_profit=270.0,
                    decision_id="frac")
    assert not v["approved"] and v["quantity"] == 0 and desk.broker.book()["working"] == []
    assert "quantity 1.7 is not a quantity this account trades (whole shares); send 1 or 2" in v["reasons"], v
    assert desk.submit(symbol="SPY", side="BUY", quantity=2.0, price=250.0, stop_loss=245.0, take_profit=270.0,
                       decision_id="whole")["approved"]


def test_the_check_that_guards_the_book_can_fail():
    """Without the working orders the stacked order would pass: the pending field is what refuses it."""
    limits = RiskLimits(allowed_symbols=["AAPL"], confidence_threshold=0.0)
    req = OrderRequest.from_dict({"account": "p", "symbol": "AAPL", "side": "BUY", "quantity": 18, "confidence": 1.0,
                                  "price": 250.0, "stop_loss": 245.0, "take_profit": 300.0, "decision_id": "z"})
    assert evaluate(limits, req, Book(equity=100_000, position=0, mark=250.0))["approved"]
    assert not evaluate(limits, req, Book(equity=100_000, position=0, pending=18, mark=250.0))["approved"]


# -- random sequences -----------------------------------------------------------------------------------
SYMS = ("SPY", "AAPL")


class RiskBookMachine(RuleBasedStateMachine):
    """Orders (sized and explicit, entries and exits), bars that trigger legs, cancels, partial fills
    and the kill switch, in any order. After every step:

    * every approved entry left the book within the position cap at the price it was judged on;
    * a fill of an exit or a leg only ever closed shares (``closed_qty == qty``): none opened or flipped;
    * after the kill switch, no approved order grew the book;
    * no live leg protects more than the filled position, or protects the wrong side.
    """

    def __init__(self):
        super().__init__()
        self.n = 0

    @initialize()
    def start(self):
        import tempfile

        from cluster.settings import load_settings

        self.tmp = tempfile.TemporaryDirectory()
        s = load_settings(use_file=False, store={"uri": f"{self.tmp.name}/store"},
                          broker={"ledger_dir": f"{self.tmp.name}/ledgers", "slippage_bps": 0,
                                  "commission_per_share": 0, "commission_min": 0},
                          accounts={"p": {}})
        self.desk = Desk(PaperAccount("p", s, KEY),
                         RiskLimits(allowed_symbols=list(SYMS), confidence_threshold=0.0, max_drawdown_pct=0.5,
                                    max_daily_loss_pct=0.5, max_position_pct=0.05, max_risk_per_trade_pct=0.02))
        self.ts = 1
        self.price = {"SPY": 250.0, "AAPL": 100.0}
        self.desk.broker.on_bars([bar(self.ts, p, sym=s) for s, p in self.price.items()])

    def teardown(self):
        self.desk.broker.ledger.close()
        self.tmp.cleanup()

    def _id(self) -> str:
        self.n += 1
        return f"o{self.n}"

    def _book(self, sym: str) -> float:
        snap = self.desk.snapshot()
        return snap["positions"].get(sym, 0.0) + snap["pending"].get(sym, 0.0)

    def _judged(self, v: dict, before: float, sym: str) -> None:
        if not v["approved"]:
            return
        after = self._book(sym)
        assert math.isclose(after, v["position_after"], abs_tol=1e-9), (after, v)
        if v["entry"]:
            equity = self.desk.broker.account()["equity"]
            cap = equity * self.desk.limits.max_position_for(sym)
            assert abs(after) * self.price[sym] <= cap * (1 + 1e-9) + 1e-6, (after, cap, v)
        else:
            assert abs(after) < abs(before) + 1e-9 and after * before >= 0, (before, after, v)
        if self.desk.kill_switch:
            assert abs(after) <= abs(before) + 1e-9, (before, after)

    @rule(sym=st.sampled_from(SYMS), side=st.sampled_from(["BUY", "SELL"]), q=st.integers(1, 40),
          bracket=st.booleans())
    def explicit_order(self, sym, side, q, bracket):
        p = self.price[sym]
        stop = round(p * (0.97 if side == "BUY" else 1.03), 2)
        take = round(p * (1.08 if side == "BUY" else 0.92), 2)
        kw = dict(stop_loss=stop, take_profit=take) if bracket else {}
        before = self._book(sym)
        self._judged(self.desk.submit(symbol=sym, side=side, quantity=q, price=p, decision_id=self._id(), **kw),
                     before, sym)

    @rule(sym=st.sampled_from(SYMS), goal=st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0]))
    def sized_order(self, sym, goal):
        before = self._book(sym)
        side = "BUY" if goal > 0 or (goal == 0 and before < 0) else "SELL"
        p = self.price[sym]
        v = self.desk.submit(symbol=sym, side=side, target_position=goal, price=p, atr=p * 0.01,
                             decision_id=self._id())
        self._judged(v, before, sym)

    @rule(moves=st.lists(st.tuples(st.sampled_from(SYMS), st.floats(-0.05, 0.05), st.floats(0, 0.04)),
                         min_size=1, max_size=3))
    def bars(self, moves):
        out = []
        for sym, ret, rng in moves:
            o = self.price[sym]
            c = round(o * (1 + ret), 2)
            out.append(bar(self.ts + 1, o, round(max(o, c) * (1 + rng), 2), round(min(o, c) * (1 - rng), 2), c,
                           sym=sym))
            self.price[sym] = c
            self.ts += 1
        magnitude = {s: abs(self._book(s)) for s in SYMS}
        self.desk.broker.on_bars(out)
        for s in SYMS:  # a fill only moves shares from working to filled, or closes them
            assert abs(self._book(s)) <= magnitude[s] + 1e-9, (s, magnitude[s], self._book(s))

    @rule(data=st.data())
    def cancel(self, data):
        working = [o for o in self.desk.broker.book()["working"] if not o["parent"]]
        if working:
            o = data.draw(st.sampled_from(working))
            self.desk.broker.cancel(o["client_order_id"])

    @rule(data=st.data())
    def partial_fill(self, data):
        """A working entry fills part of its quantity (the rest is dropped), as a broker may."""
        working = [o for o in self.desk.broker.book()["working"] if not o["parent"] and not o["reduce_only"]
                   and o["qty"] >= 2]
        if working:
            o = data.draw(st.sampled_from(working))
            part = data.draw(st.integers(1, int(o["qty"]) - 1))
            self.desk.broker.ledger.apply_fill(o["client_order_id"], self.price[o["symbol"]], 0.0, ts=self.ts,
                                               qty=float(part))

    @rule()
    def kill_switch(self):
        self.desk.kill_switch = "drawdown reached the limit"

    @invariant()
    def exits_and_legs_only_close(self):
        if not hasattr(self, "desk"):
            return
        db = self.desk.broker.ledger._db
        bad = db.execute("SELECT f.client_order_id, f.qty, f.closed_qty FROM fills f JOIN orders o "
                         "ON o.client_order_id = f.client_order_id WHERE (o.reduce_only = 1 OR o.parent IS NOT NULL) "
                         "AND abs(f.closed_qty - f.qty) > 1e-9").fetchall()
        assert not bad, [tuple(r) for r in bad]

    @invariant()
    def live_legs_fit_the_position(self):
        if not hasattr(self, "desk"):
            return
        book = self.desk.broker.book()
        for sym in SYMS:
            q = book["positions"].get(sym, 0.0)
            pairs: dict[str, float] = {}
            for o in book["working"]:
                if o["parent"] and o["symbol"] == sym and o["status"] == "pending":
                    assert q != 0 and (o["side"] == "SELL") == (q > 0), (sym, q, o)
                    pairs[o["parent"]] = max(pairs.get(o["parent"], 0.0), o["qty"])
            assert sum(pairs.values()) <= abs(q) + 1e-9, (sym, q, pairs)


RiskBookMachine.TestCase.settings = hsettings(max_examples=60, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestRiskBook = RiskBookMachine.TestCase


def test_fills_that_stop_are_reported_not_silent(desk):
    """A market order fills on the next bar; one that waits past broker.fill_stall_s (30 s) makes the
    broker's health say fills are stalled, with the order and what to check; the next bar clears it."""
    desk.submit(symbol="SPY", side="BUY", quantity=2, price=250.0, stop_loss=245.0, take_profit=260.0,
                decision_id="w1")
    placed = desk.broker.order("w1")["created_at"]
    assert not desk.broker.fills(now=placed + 29)["stalled"]
    late = desk.broker.fills(now=placed + 31)
    assert late["stalled"] and late["late"] == 1 and late["oldest"]["client_order_id"] == "w1"
    assert "fills stalled: 1 market order(s) waiting over 30 s" in late["error"]
    assert "check the bar pump" in late["error"]
    assert desk.broker.health()["ok"]  # now, seconds after placing: not stalled yet
    desk.broker.on_bars([bar(2, 250.0)])
    after = desk.broker.fills(now=placed + 31)
    assert not after["stalled"] and after["working"] == 0 and after["late"] == 0 and "error" not in after
