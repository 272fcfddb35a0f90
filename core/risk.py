"""Risk rules: what an order may be, and how big. Ray-free, so it is tested by hand.

``evaluate(limits, request, book)`` is the one place every order is judged. It
returns a verdict: ``approved``, the sized ``quantity``, ``reasons`` (one line
per refusal, or one line saying how it was sized) and ``checks`` (every rule,
with the value it saw and its limit). The actor in ``actors/risk.py`` holds the
state (equity peak, day start, halts) and passes it in as a ``Book``.

Sizing (the position-size multiplier)::

    m          = |target_position| * confidence              in [0, 1]
    d          = |price - stop_loss|, else atr_stop_multiple * atr   (stop distance)
    q_risk     = floor(equity * max_risk_per_trade_pct * m / d)
    q_cap      = floor(equity * max_position_for(symbol) / price)
    target     = sign(target_position) * min(q_risk, q_cap)      (shares)
    quantity   = |target - current position|, side from its sign

An order that names its own ``quantity`` (a manual order) is not resized: it
is checked against the same limits and refused if it breaks one.

The position is the account's **book**: filled shares plus the working
(pending) entry and exit orders of the symbol, ``Book.position + Book.pending``.
Every limit is judged on it, so orders waiting for the next bar count as if
filled, and any number of orders on one bar can never together pass a limit
that one order of their sum would break. (The risk manager judges one order at
a time per account and books it before the next is judged: check and
reservation are one step.)

Entries and exits: an order that only reduces the book's position (no flip
through zero) is an exit. Exits are allowed whatever the halts, the
confidence or the symbol list say, because refusing to reduce risk never
protects anyone; after the kill switch exits are the only orders that pass.
An exit is booked *reduce-only*: when it fills it is cut to the filled
position then, so no race with a bracket leg or another exit can carry it
through zero. Entries (opening, adding, flipping) must pass every check, and
their price may be at most ``max_price_deviation_pct`` from the account's own
last mark of the symbol (``Book.mark``), so a caller's price cannot size an
order (checked when the broker has a mark; a paper broker has one from its
first bar).

Bracket legs are the broker's, named ``<entry id>-sl`` and ``<entry id>-tp``;
a decision id in that namespace is refused.

Limits are ``core.risk_limits.RiskLimits``, read duck-typed: any object with
its fields will do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SIDES = ("BUY", "SELL")
_EPS = 1e-9
LEG_SUFFIXES = ("-sl", "-tp")  # a bracket leg's id is its entry's id and one of these


def leg_ids(client_order_id: str) -> tuple[str, str]:
    """The (stop-loss, take-profit) leg ids of an entry: the broker's own, never a client's."""
    return f"{client_order_id}-sl", f"{client_order_id}-tp"


class OrderRequestError(ValueError):
    """An order request that cannot be judged; the message says what to fix."""


def _num(d: dict[str, Any], name: str, *, required: bool = True, lo: float | None = None, hi: float | None = None,
         positive: bool = False) -> float | None:
    v = d.get(name)
    if v is None:
        if required:
            raise OrderRequestError(f"{name} is required")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OrderRequestError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise OrderRequestError(f"{name} must be a finite number, got {v}")
    if positive and v <= 0:
        raise OrderRequestError(f"{name} must be > 0, got {v}")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise OrderRequestError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


@dataclass(frozen=True)
class OrderRequest:
    """What the ingress asks for. ``decision_id`` is the order's client order id."""

    account: str
    symbol: str
    side: str
    confidence: float
    price: float
    decision_id: str
    target_position: float | None = None
    atr: float | None = None
    stop_loss: float | None = None
    take_profit: float | None = None
    quantity: float | None = None
    members: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OrderRequest":
        if not isinstance(d, dict):
            raise OrderRequestError("the order request must be an object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise OrderRequestError(f"unknown field(s) {', '.join(sorted(unknown))}")
        for name in ("account", "symbol", "side", "decision_id"):
            if not isinstance(d.get(name), str) or not d[name].strip():
                raise OrderRequestError(f"{name} is required (a non-empty string)")
        side = d["side"].upper()
        if side not in SIDES:
            raise OrderRequestError(f"side must be BUY or SELL, got {d['side']!r}")
        cid = d["decision_id"]
        if len(cid) > 128 or not all(c.isalnum() or c in "-_.:" for c in cid):
            raise OrderRequestError("decision_id must be at most 128 letters, digits or - _ . :")
        if cid.lower().endswith(LEG_SUFFIXES):
            raise OrderRequestError(f"decision_id {cid!r} ends in -sl or -tp, which name bracket legs; "
                                    "choose an id that does not")
        qty = _num(d, "quantity", required=False, positive=True)
        tp = _num(d, "target_position", required=qty is None, lo=-1.0, hi=1.0)
        members = d.get("members") or {}
        if not isinstance(members, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in members.items()
        ):
            raise OrderRequestError("members must map member names to finite numbers")
        return cls(
            account=d["account"], symbol=d["symbol"].strip().upper(), side=side,
            confidence=_num(d, "confidence", lo=0.0, hi=1.0), price=_num(d, "price", positive=True),
            decision_id=cid, target_position=tp, atr=_num(d, "atr", required=False, positive=True),
            stop_loss=_num(d, "stop_loss", required=False, positive=True),
            take_profit=_num(d, "take_profit", required=False, positive=True), quantity=qty,
            members={k: float(v) for k, v in members.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Book:
    """The account as the risk manager sees it when it judges one order."""

    equity: float
    position: float = 0.0  # signed filled shares of the order's symbol
    pending: float = 0.0  # signed shares of the symbol's working orders (not their bracket legs)
    mark: float | None = None  # the account's own last price of the symbol, when it has one
    day_start_equity: float | None = None
    peak_equity: float | None = None
    halted: str | None = None  # an admin's halt, with its reason
    kill_switch: str | None = None  # the latched drawdown kill switch, with its reason
    daily_halt: str | None = None  # today's loss halt, with its reason


def bad_request_verdict(message: str, order_request: Any) -> dict[str, Any]:
    """The verdict on an order request that could not be read: refused, saying what to fix."""
    d = order_request if isinstance(order_request, dict) else {}
    return {"approved": False, "quantity": 0.0, "reasons": [message], "error": "bad_request",
            "checks": {"request": {"ok": False}}, "decision_id": d.get("decision_id"),
            "symbol": d.get("symbol"), "side": d.get("side"), "account": d.get("account")}


def book_from_snapshot(snapshot: dict[str, Any], symbol: str) -> Book:
    """The ``Book`` for one symbol from an account snapshot (``RiskManager.snapshot``).

    The risk manager judges from it, and so does the ingress's preview of a
    verdict: one reading of the account, whoever judges.
    """
    mark = (snapshot.get("marks") or {}).get(symbol)
    return Book(
        equity=float(snapshot["equity"]), position=float(snapshot["positions"].get(symbol, 0.0)),
        pending=float((snapshot.get("pending") or {}).get(symbol, 0.0)),
        mark=float(mark) if mark is not None else None,
        day_start_equity=snapshot.get("day_start_equity"), peak_equity=snapshot.get("peak_equity"),
        halted=snapshot.get("halted"), kill_switch=snapshot.get("kill_switch"), daily_halt=snapshot.get("daily_halt"),
    )


def pending_by_symbol(working: list[dict[str, Any]], positions: dict[str, float]) -> dict[str, float]:
    """What the working orders will add to each filled position, in signed shares: the book less the fills.

    Working market orders fill in the order they were booked, so they are applied to the
    filled position in that order; a reduce-only one (an exit) moves it toward zero and no
    further, as the broker will fill it. Bracket legs (orders with a parent) are left out:
    they only ever reduce the filled position (the broker cuts them to it), so they add no risk.
    """
    book = {sym: float(q) for sym, q in positions.items()}
    start = dict(book)
    for o in sorted((o for o in working if not o.get("parent")), key=lambda o: o.get("seq", 0)):
        sym, q = o["symbol"], float(o["qty"])
        now = book.get(sym, 0.0)
        signed = q if o["side"] == "BUY" else -q
        if o.get("reduce_only"):
            reduces = now != 0 and (now > 0) != (signed > 0)
            signed = math.copysign(min(q, abs(now)), signed) if reduces else 0.0
        book[sym] = now + signed
    return {sym: book[sym] - start.get(sym, 0.0) for sym in book if book[sym] != start.get(sym, 0.0)}


def day_pnl(book: Book) -> float:
    return book.equity - (book.day_start_equity if book.day_start_equity is not None else book.equity)


def drawdown(book: Book) -> float:
    peak = max(book.peak_equity or book.equity, book.equity)
    return (peak - book.equity) / peak if peak > 0 else 0.0


def daily_loss_breached(limits: Any, book: Book) -> bool:
    start = book.day_start_equity if book.day_start_equity is not None else book.equity
    return day_pnl(book) <= -limits.max_daily_loss_pct * start + _EPS


def drawdown_breached(limits: Any, book: Book) -> bool:
    return drawdown(book) >= limits.max_drawdown_pct - _EPS


def _floor_qty(q: float, whole: bool) -> float:
    if q <= 0 or not math.isfinite(q):
        return 0.0
    if whole:
        return float(math.floor(q + _EPS))
    return math.floor(q * 1e6 + _EPS) / 1e6


def stop_and_target(limits: Any, req: OrderRequest, long: bool) -> tuple[float | None, float | None, float | None]:
    """(stop distance, stop-loss, take-profit) for an entry in direction ``long``.

    A stop given wins over the ATR; a take-profit not given is set at exactly
    ``min_reward_risk`` stop distances, so the bracket always has both legs.
    """
    if req.stop_loss is not None:
        stop = round(req.stop_loss, 2)
    elif req.atr is not None:
        reach = limits.atr_stop_multiple * req.atr
        # Order prices are in cents. Rounded toward the price, the stop risks no more than the
        # ATR rule allows.
        stop = _cents(req.price - reach, up=True) if long else _cents(req.price + reach, up=False)
    else:
        return None, None, None
    d = abs(req.price - stop)  # the distance the order will carry: what sizing and the checks use
    if req.take_profit is not None:
        take = round(req.take_profit, 2)
    else:
        # Rounded away from the price, so the bracket this sets passes the reward:risk check it is
        # set for (rounded to the nearest cent, half the time it fell just short and was refused).
        reward = limits.min_reward_risk * d
        take = _cents(req.price + reward, up=True) if long else _cents(req.price - reward, up=False)
    return d, stop, take


def _below(value: float, limit: float) -> str:
    """``value`` with two decimals, or as many more as it takes not to print the limit itself
    ("1.998 is below 2.00", not "2.00 is below 2.00")."""
    for places in range(2, 9):
        text = f"{value:.{places}f}"
        if float(text) < limit:
            return text
    return repr(value)


def _cents(price: float, up: bool) -> float:
    """``price`` rounded up or down to a cent (a price already in cents stays as it is)."""
    scaled = price * 100.0
    return (math.ceil(scaled - 1e-6) if up else math.floor(scaled + 1e-6)) / 100.0


def size(limits: Any, req: OrderRequest, equity: float, stop_distance: float | None) -> dict[str, Any]:
    """Target position in signed shares from confidence, price and the stop distance (see module doc)."""
    tp = req.target_position or 0.0
    m = abs(tp) * req.confidence
    cap_value = equity * limits.max_position_for(req.symbol)
    q_cap = _floor_qty(cap_value / req.price, limits.whole_shares)
    out: dict[str, Any] = {"multiplier": round(m, 6), "position_cap_value": round(cap_value, 2), "q_cap": q_cap}
    if tp == 0:
        return {**out, "target_shares": 0.0, "binding": "target is flat"}
    if not stop_distance:
        return {**out, "target_shares": None, "binding": "no stop distance: give atr or stop_loss"}
    budget = equity * limits.max_risk_per_trade_pct * m
    q_risk = _floor_qty(budget / stop_distance, limits.whole_shares)
    target = min(q_risk, q_cap)
    binding = "max risk per trade" if q_risk <= q_cap else "max position size"
    return {**out, "risk_budget": round(budget, 2), "stop_distance": round(stop_distance, 6), "q_risk": q_risk,
            "target_shares": math.copysign(target, tp) if target else 0.0, "binding": binding}


def evaluate(limits: Any, req: OrderRequest, book: Book) -> dict[str, Any]:
    """Judge one order request against ``limits`` and the account ``book``. Never raises for a bad order."""
    checks: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []

    def check(name: str, ok: bool, reason: str, **seen: Any) -> None:
        checks[name] = {"ok": bool(ok), **seen}
        if not ok:
            reasons.append(reason)

    buy = req.side == "BUY"
    current = float(book.position) + float(book.pending)  # the book: filled plus working
    # Stop distance in the direction the position will face after the order.
    long_after = buy if req.quantity is not None else (req.target_position or 0.0) > 0 or (
        (req.target_position or 0.0) == 0 and current < 0)
    d, stop, take = stop_and_target(limits, req, long_after)

    # -- how much ------------------------------------------------------------------------
    sizing: dict[str, Any] = {}
    if req.quantity is not None:
        qty = _floor_qty(req.quantity, limits.whole_shares)
        delta = qty if buy else -qty
        sizing = {"explicit_quantity": req.quantity}
    else:
        sizing = size(limits, req, book.equity, d)
        target = sizing["target_shares"]
        delta = 0.0 if target is None else target - current
        qty = abs(delta)
    new_position = current + delta
    exit_only = qty > 0 and abs(new_position) < abs(current) + _EPS and new_position * current >= 0
    entry = not exit_only
    added = abs(new_position) if new_position * current < 0 else max(0.0, abs(new_position) - abs(current))

    if req.quantity is not None and qty != req.quantity:
        unit = "whole shares" if limits.whole_shares else "at most 6 decimals"
        check("sizing", False, f"quantity {req.quantity:g} is not a quantity this account trades ({unit}); "
              f"send {qty:g} or {qty + (1 if limits.whole_shares else 1e-6):g}", quantity=req.quantity)
    elif req.quantity is None and sizing.get("target_shares") is None:
        check("sizing", False, f"cannot size {req.symbol}: {sizing['binding']}", binding=sizing["binding"])
    elif (delta > 0) != buy or qty <= 0:
        why = (f"{req.side} {req.symbol}: position {current:g} is already at the target {current + delta:g}"
               + (f" ({sizing['binding']})" if sizing.get("binding") else "")
               if qty <= 0 or delta == 0 else
               f"{req.side} {req.symbol} moves the wrong way: target {current + delta:g} from position {current:g}")
        binding = sizing.get("binding")
        if qty <= 0 and req.quantity is None and current == 0 and binding == "max risk per trade":
            budget = sizing["risk_budget"]
            check("risk_per_trade", False,
                  f"one share of {req.symbol} risks {d:.2f} to the stop, more than the budget {budget:.2f} "
                  f"({limits.max_risk_per_trade_pct:.2%} of equity x multiplier {sizing['multiplier']:.2f})",
                  value=round(d, 2), limit=budget)
            checks["sizing"] = {"ok": False, "binding": binding}
        elif qty <= 0 and req.quantity is None and current == 0 and binding == "max position size":
            check("max_position", False,
                  f"one share of {req.symbol} at {req.price} exceeds the max position "
                  f"{sizing['position_cap_value']:.2f} ({limits.max_position_for(req.symbol):.2%} of equity)",
                  value=req.price, limit=sizing["position_cap_value"])
            checks["sizing"] = {"ok": False, "binding": binding}
        else:
            check("sizing", False, why, current=current, target=current + delta)
    else:
        check("sizing", True, "", quantity=qty, current=current, target=new_position)

    skip = {"ok": True, "skipped": "exit: reduces the position"}

    # -- who may trade at all ------------------------------------------------------------
    if entry:
        check("allowed_symbol", req.symbol in limits.allowed_symbols,
              f"{req.symbol} is not an allowed symbol ({', '.join(limits.allowed_symbols)})", symbol=req.symbol)
        check("kill_switch", book.kill_switch is None, f"kill switch on: {book.kill_switch}; an admin must resume",
              on=book.kill_switch is not None)
        check("halt", book.halted is None, f"trading halted: {book.halted}", on=book.halted is not None)
        dd = drawdown(book)
        check("max_drawdown", not drawdown_breached(limits, book),
              f"drawdown {dd:.2%} reached the limit {limits.max_drawdown_pct:.2%}: kill switch",
              value=round(dd, 6), limit=limits.max_drawdown_pct)
        pnl = day_pnl(book)
        check("daily_loss", book.daily_halt is None and not daily_loss_breached(limits, book),
              book.daily_halt or f"day P&L {pnl:.2f} breached the daily loss limit "
              f"{limits.max_daily_loss_pct:.2%}: no new entries today",
              value=round(pnl, 2), limit=round(-limits.max_daily_loss_pct * (book.day_start_equity or book.equity), 2))
        check("confidence", req.confidence >= limits.confidence_threshold - _EPS,
              f"confidence {_below(req.confidence, limits.confidence_threshold)} is below the threshold "
              f"{limits.confidence_threshold:.2f}",
              value=req.confidence, limit=limits.confidence_threshold)
        if book.mark is None:
            checks["price"] = {"ok": True, "skipped": "no mark of the symbol yet"}
        else:
            dev = abs(req.price - book.mark) / book.mark
            check("price", dev <= limits.max_price_deviation_pct + _EPS,
                  f"price {req.price:g} is {dev:.2%} from the account's last price of {req.symbol} "
                  f"{book.mark:g} (at most {limits.max_price_deviation_pct:.2%}): orders are sized on the "
                  f"system's own prices", value=req.price, mark=book.mark, limit=limits.max_price_deviation_pct)
    else:
        checks["price"] = dict(skip)
        for name in ("allowed_symbol", "kill_switch", "halt", "max_drawdown", "daily_loss", "confidence"):
            checks[name] = dict(skip)

    # -- how much may be at stake --------------------------------------------------------
    if entry and qty > 0:
        if d is None:
            check("stop", False, "an entry needs a stop: give stop_loss or atr")
        else:
            long = new_position > 0
            side_ok = (stop < req.price < take) if long else (take < req.price < stop)
            check("stop", side_ok and d > 0,
                  f"stop_loss {stop} and take_profit {take} must lie either side of price {req.price} "
                  f"({'stop below, target above' if long else 'stop above, target below'})",
                  stop_loss=stop, take_profit=take)
            rr = abs(take - req.price) / d if d > 0 else 0.0
            check("reward_risk", rr >= limits.min_reward_risk - 1e-6,
                  f"reward:risk {_below(rr, limits.min_reward_risk)} is below the minimum "
                  f"{limits.min_reward_risk:.2f}",
                  value=round(rr, 4), limit=limits.min_reward_risk)
            risk = added * d
            budget = book.equity * limits.max_risk_per_trade_pct
            check("risk_per_trade", risk <= budget * (1 + _EPS) + _EPS,
                  f"risk to the stop {risk:.2f} exceeds {limits.max_risk_per_trade_pct:.2%} of equity ({budget:.2f})",
                  value=round(risk, 2), limit=round(budget, 2))
        value = abs(new_position) * req.price
        cap = book.equity * limits.max_position_for(req.symbol)
        check("max_position", value <= cap * (1 + _EPS) + _EPS,
              f"position {abs(new_position):g} {req.symbol} = {value:.2f} exceeds "
              f"{limits.max_position_for(req.symbol):.2%} of equity ({cap:.2f})",
              value=round(value, 2), limit=round(cap, 2))
    else:
        for name in ("stop", "reward_risk", "risk_per_trade", "max_position"):
            checks.setdefault(name, dict(skip) if exit_only else {"ok": True, "skipped": "nothing to place"})

    approved = not reasons
    if approved:
        how = "exit, reduces the position" if exit_only else (
            f"sized by {sizing['binding']} (multiplier {sizing['multiplier']:.2f})"
            if req.quantity is None else "explicit quantity")
        reasons.append(f"approved: {req.side} {qty:g} {req.symbol}; {how}")
    return {
        "approved": approved,
        "quantity": qty if approved else 0.0,
        "reasons": reasons,
        "checks": checks,
        "account": req.account,
        "symbol": req.symbol,
        "side": req.side,
        "decision_id": req.decision_id,
        "entry": entry,
        "position_before": current,
        "position_after": new_position if approved else current,
        "filled_position": float(book.position),
        "pending_position": float(book.pending),
        "stop_loss": stop if entry else None,
        "take_profit": take if entry else None,
        "sizing": sizing,
    }


def order_for(req: OrderRequest, verdict: dict[str, Any]) -> dict[str, Any]:
    """The broker order an approved verdict places: its quantity and bracket, reduce-only when it is an exit."""
    return {"client_order_id": req.decision_id, "account": req.account, "symbol": req.symbol,
            "side": req.side, "qty": float(verdict["quantity"]), "stop_loss": verdict.get("stop_loss"),
            "take_profit": verdict.get("take_profit"), "members": req.members,
            "reduce_only": not verdict.get("entry", True),
            "verdict": {"reasons": verdict["reasons"], "at": verdict.get("at")}}


# -- verdict tokens: the broker places only what the risk manager signed -------------------------------
_SIGNED_FIELDS = ("client_order_id", "account", "symbol", "side", "qty", "stop_loss", "take_profit", "reduce_only")


class VerdictTokenError(PermissionError):
    """An order without a valid verdict token from the risk manager; the broker refuses it."""


def _canonical(order: dict[str, Any], expires_at: float) -> bytes:
    import json

    body = {k: order.get(k) for k in _SIGNED_FIELDS}
    body["qty"] = float(body["qty"]) if body["qty"] is not None else None
    body["reduce_only"] = bool(body["reduce_only"])
    body["expires_at"] = round(float(expires_at), 3)
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_order(key: bytes, order: dict[str, Any], ttl_s: float, now: float | None = None) -> str:
    """A token binding exactly this order (id, symbol, side, quantity, bracket) for ``ttl_s`` seconds."""
    import hashlib
    import hmac
    import time

    expires_at = round((time.time() if now is None else now) + ttl_s, 3)
    mac = hmac.new(key, _canonical(order, expires_at), hashlib.sha256).hexdigest()
    return f"{expires_at:.3f}.{mac}"


def verify_order(key: bytes, order: dict[str, Any], token: Any, now: float | None = None,
                 check_expiry: bool = True) -> None:
    """Raise ``VerdictTokenError`` unless ``token`` was signed with ``key`` for exactly this order."""
    import hashlib
    import hmac
    import time

    if not isinstance(token, str) or "." not in token:
        raise VerdictTokenError("order refused: the broker takes orders only from the risk manager (no verdict token)")
    exp_s, _, mac = token.rpartition(".")
    try:
        expires_at = float(exp_s)
    except ValueError:
        raise VerdictTokenError("order refused: malformed verdict token") from None
    want = hmac.new(key, _canonical(order, expires_at), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        raise VerdictTokenError("order refused: the verdict token does not match this order or was not "
                                "signed by this account's risk manager")
    if check_expiry and (time.time() if now is None else now) > expires_at:
        raise VerdictTokenError("order refused: the verdict token has expired; ask the risk manager again")
