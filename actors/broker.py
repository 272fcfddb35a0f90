"""Brokers: a paper broker on the ledger, and Alpaca's trading API. One per account.

Both take orders only through ``place(order, token)``, and only with a verdict
token that the account's risk manager signed (HMAC-SHA256 over the client
order id, symbol, side, quantity and bracket, with a key the two actors share
and nothing else holds). An order that did not pass the risk manager, or that
was changed after it passed, is refused with ``VerdictTokenError``. So the
limits cannot be bypassed through any route, even by code that can reach the
broker actor by name.

Both are idempotent by client order id (the decision id): placing the same id
again returns the first order.

* ``PaperBroker`` (named ``broker:<account>``): market orders fill at the open
  of the next bar of their symbol, moved against the taker by
  ``broker.slippage_bps`` and rounded to the cent, with commission
  ``max(broker.commission_min, broker.commission_per_share * qty)``. Bracket
  legs (stop-loss, take-profit) go live from the bar after the entry fills; a
  stop fills at the worse of the open and the stop (less slippage), a
  take-profit at the better of the open and its limit; when one bar touches
  both, the stop fills (the cautious assumption). Bars arrive by
  ``on_bars(list)``; a bar at or before the last one seen for its symbol is
  ignored, and each bar is one transaction, so a restarted broker fed the
  same bars again neither loses nor doubles a fill.
* ``AlpacaBroker``: alpaca-py's ``TradingClient`` (paper unless the account's
  ``risk.production`` is on), bracket orders, retries with backoff behind the
  circuit breaker. A request that times out may have been accepted, so every
  retry first looks the order up by client order id and never places it twice.
  Wrong keys give one ``AlpacaAuthError`` that names the settings to fix and
  no secret.

Shared shapes (both brokers): ``place`` / ``order`` return an order dict
(``client_order_id``, ``symbol``, ``side``, ``qty``, ``type``, ``status``
(pending, held, filled, canceled, rejected, or Alpaca's status), ``fill_price``,
``commission``, ``stop_loss``, ``take_profit``, ``members``, ...);
``positions()`` a list of ``{symbol, qty, avg_price, price, market_value,
unrealized_pnl}``; ``account()`` ``{account, kind, cash, equity, pnl,
realized_pnl, unrealized_pnl, ...}``; ``analytics(days)`` see ``core.ledger``.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray

from cluster.logs import add_secrets, get_logger, scrub
from cluster.settings import Settings
from core.ledger import Ledger, cents
from core.resilience import Resilient
from core.risk import VerdictTokenError, leg_ids, verify_order

log = get_logger("broker")


def ledger_dir(settings: Settings, account: str) -> Path:
    return Path(settings.broker.ledger_dir) / account


def _bar_ts(ts: Any) -> int:
    """A bar's time as integer nanoseconds since the epoch (ints pass through)."""
    if isinstance(ts, bool):
        raise ValueError("bar ts must be a time")
    if isinstance(ts, int):
        return ts
    if isinstance(ts, float):
        return int(ts)
    if hasattr(ts, "value") and hasattr(ts, "tz_convert"):  # pandas Timestamp
        return int(ts.value)
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        delta = ts - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    raise ValueError(f"bar ts {ts!r} is not a time")


class _BrokerBase:
    kind = "base"

    def __init__(self, account: str, settings: Settings, signing_key: bytes):
        if account not in settings.accounts:
            raise ValueError(f"unknown account {account!r}; accounts are {', '.join(settings.accounts)}")
        if not signing_key:
            raise ValueError("a broker needs the risk manager's signing key")
        self.account_name = account
        self.settings = settings
        self._key = bytes(signing_key)
        add_secrets(settings.secret_values())

    def _verify(self, order: dict[str, Any], token: Any, *, check_expiry: bool) -> None:
        if order.get("account") != self.account_name:
            raise VerdictTokenError(f"order for account {order.get('account')!r} sent to {self.account_name!r}")
        verify_order(self._key, order, token, check_expiry=check_expiry)

    def health(self) -> dict[str, Any]:
        return {"account": self.account_name, "kind": self.kind, "ok": True}


class PaperAccount(_BrokerBase):
    """The paper broker's logic, without Ray (``PaperBroker`` is this as an actor)."""

    kind = "paper"

    def __init__(self, account: str, settings: Settings, signing_key: bytes):
        super().__init__(account, settings, signing_key)
        acc = settings.accounts[account]
        cash = acc.starting_cash or settings.broker.starting_cash
        self.ledger = Ledger(ledger_dir(settings, account) / "ledger.sqlite", cash)
        self.bars_seen = 0
        self.last_bar_at: float | None = None  # wall time of the last new bar

    # -- orders -------------------------------------------------------------------------
    def place(self, order: dict[str, Any], token: str) -> dict[str, Any]:
        """Book a market order (with its bracket legs) signed by the risk manager; idempotent by client order id."""
        self._verify(order, token, check_expiry=False)
        cid = order["client_order_id"]
        existing = self.ledger.order(cid)
        if existing is not None:
            return existing
        self._verify(order, token, check_expiry=True)
        sym, side, qty = order["symbol"], order["side"], float(order["qty"])
        after = self.ledger.last_ts(sym)
        exit_side = "SELL" if side == "BUY" else "BUY"
        sl_id, tp_id = leg_ids(cid)
        if self.ledger.order(sl_id) is not None or self.ledger.order(tp_id) is not None:
            raise VerdictTokenError(f"order refused: {sl_id} or {tp_id} already names an order, and bracket leg "
                                    "ids are the broker's own; choose another client order id")
        with self.ledger.transaction():
            entry, _ = self.ledger.add_order({
                "client_order_id": cid, "account": self.account_name, "symbol": sym, "side": side, "qty": qty,
                "type": "market", "stop_loss": order.get("stop_loss"), "take_profit": order.get("take_profit"),
                "status": "pending", "after_ts": after, "members": order.get("members") or {},
                "verdict": order.get("verdict"), "reduce_only": bool(order.get("reduce_only")),
            })
            # Stop before take-profit: legs are tried in this order, so a bar touching both fills the stop.
            if order.get("stop_loss") is not None:
                self.ledger.add_order({"client_order_id": sl_id, "account": self.account_name, "symbol": sym,
                                       "side": exit_side, "qty": qty, "type": "stop",
                                       "stop_price": order["stop_loss"], "parent": cid, "status": "held",
                                       "after_ts": after, "reduce_only": True})
            if order.get("take_profit") is not None:
                self.ledger.add_order({"client_order_id": tp_id, "account": self.account_name, "symbol": sym,
                                       "side": exit_side, "qty": qty, "type": "limit",
                                       "limit_price": order["take_profit"], "parent": cid, "status": "held",
                                       "after_ts": after, "reduce_only": True})
        log.info("paper %s: booked %s %s %g (%s)", self.account_name, side, sym, qty, cid)
        return self.ledger.order(cid)

    def order(self, client_order_id: str) -> dict[str, Any] | None:
        return self.ledger.order(client_order_id)

    def orders(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.ledger.orders(limit)

    def cancel(self, client_order_id: str) -> dict[str, Any] | None:
        """Cancel an order still waiting for its bar (and its legs). Reduces risk, so no token is needed."""
        o = self.ledger.order(client_order_id)
        if o is not None and o["status"] in ("pending", "held"):
            with self.ledger.transaction():
                self.ledger.update_order(client_order_id, status="canceled", reason="canceled")
                for leg in leg_ids(client_order_id):
                    lo = self.ledger.order(leg)
                    if lo is not None and lo["status"] in ("pending", "held"):
                        self.ledger.update_order(leg, status="canceled", reason="entry canceled")
        return self.ledger.order(client_order_id)

    # -- bars and fills -----------------------------------------------------------------
    def _slipped(self, price: float, side: str) -> float:
        s = self.settings.broker.slippage_bps / 1e4
        return cents(price * (1 + s) if side == "BUY" else price * (1 - s))

    def _commission(self, qty: float) -> float:
        b = self.settings.broker
        return cents(max(b.commission_min, b.commission_per_share * qty))

    def _fill_price(self, o: dict[str, Any], bar: dict[str, Any]) -> float | None:
        op, hi, lo = float(bar["open"]), float(bar["high"]), float(bar["low"])
        buy = o["side"] == "BUY"
        if o["type"] == "market":
            return self._slipped(op, o["side"])
        if o["type"] == "stop":
            stop = o["stop_price"]
            if buy and hi >= stop:
                return self._slipped(max(op, stop), "BUY")
            if not buy and lo <= stop:
                return self._slipped(min(op, stop), "SELL")
            return None
        if o["type"] == "limit":
            lim = o["limit_price"]
            if buy and lo <= lim:
                return cents(min(op, lim))
            if not buy and hi >= lim:
                return cents(max(op, lim))
        return None

    def on_bars(self, bars: list[dict[str, Any]]) -> dict[str, int]:
        """Fill what the bars allow, in time order. Returns counts of bars used and fills made."""
        used = fills = 0
        for bar in sorted(bars, key=lambda b: _bar_ts(b["ts"])):
            sym = str(bar["symbol"]).upper()
            ts = _bar_ts(bar["ts"])
            if ts <= self.ledger.last_ts(sym):
                continue  # seen before (a replay after a restart, or a duplicate)
            with self.ledger.transaction():
                order_of = {"market": 0, "stop": 1, "limit": 2}
                for o in sorted(self.ledger.open_orders(sym), key=lambda o: (order_of.get(o["type"], 3), o["seq"])):
                    o = self.ledger.order(o["client_order_id"])  # an OCO sibling may have just been canceled
                    if o["status"] != "pending" or o["after_ts"] >= ts:
                        continue
                    price = self._fill_price(o, bar)
                    if price is None:
                        continue
                    qty = o["qty"]
                    if o["reduce_only"] or o["parent"]:  # an exit or a leg: never through zero
                        qty = self.ledger.reducible(o)
                        if qty <= 0:
                            self.ledger.update_order(o["client_order_id"], status="canceled",
                                                     reason="reduce-only: no position left to reduce")
                            continue
                    self.ledger.apply_fill(o["client_order_id"], price, self._commission(qty), ts=ts, qty=qty)
                    fills += 1
                self.ledger.mark(sym, float(bar["close"]), ts)
            used += 1
        self.bars_seen += used
        if used:
            self.last_bar_at = time.time()
        return {"bars": used, "fills": fills}

    # -- views --------------------------------------------------------------------------
    def positions(self) -> list[dict[str, Any]]:
        return self.ledger.positions()

    def book(self) -> dict[str, Any]:
        """What the risk manager judges on: filled positions, working orders (legs included), marks.

        One call of this one-threaded actor, so no bar's fills land between the three reads.
        """
        return {"positions": {p["symbol"]: float(p["qty"]) for p in self.ledger.positions()},
                "working": self.ledger.open_orders(), "marks": self.ledger.marks()}

    def account(self) -> dict[str, Any]:
        # market_ts: the bars' own clock, which the risk day follows (core.market_clock).
        return {"account": self.account_name, "kind": self.kind, **self.ledger.account(),
                "market_ts": self.ledger.market_ts()}

    def analytics(self, days: float = 30.0) -> dict[str, Any]:
        return {"account": self.account_name, **self.ledger.analytics(days)}

    def fills(self, now: float | None = None) -> dict[str, Any]:
        """Whether fills are flowing: a market order fills on its symbol's next bar, so one that has
        waited ``broker.fill_stall_s`` means no bar reaches this broker (the bar pump, the feeds)."""
        now = time.time() if now is None else now
        waiting = [o for o in self.ledger.open_orders() if o["status"] == "pending" and o["type"] == "market"]
        limit = self.settings.broker.fill_stall_s
        late = [o for o in waiting if now - o["created_at"] > limit]
        out = {"working": len(waiting), "late": len(late), "stall_after_s": limit, "last_bar_at": self.last_bar_at,
               "stalled": bool(late)}
        if late:
            oldest = min(late, key=lambda o: o["created_at"])
            out["oldest"] = {"client_order_id": oldest["client_order_id"], "symbol": oldest["symbol"],
                             "waiting_s": round(now - oldest["created_at"], 1)}
            out["error"] = (f"fills stalled: {len(late)} market order(s) waiting over {limit:g} s for a bar "
                            f"(oldest {oldest['client_order_id']} on {oldest['symbol']}, "
                            f"{now - oldest['created_at']:.0f} s); no bars reach broker:{self.account_name} "
                            "(check the bar pump and the feeds)")
        return out

    def health(self) -> dict[str, Any]:
        fills = self.fills()
        out = {"account": self.account_name, "kind": self.kind, "ok": not fills["stalled"],
               "ledger": str(self.ledger.path), "journal_mode": self.ledger.journal_mode(),
               "bars_seen": self.bars_seen, "fills": fills}
        if fills["stalled"]:
            out["error"] = fills["error"]
        return out


@ray.remote
class PaperBroker(PaperAccount):
    """``PaperAccount`` as a named Ray actor (``broker:<account>``)."""


# -- Alpaca -------------------------------------------------------------------------------------


class AlpacaAuthError(PermissionError):
    """Alpaca refused the keys; retrying cannot help."""


class OrderRejected(ValueError):
    """The broker answered and refused the order (buying power, validation); retrying cannot help."""


_FINAL = {"filled", "canceled", "expired", "rejected", "done_for_day", "replaced"}


def _order_dict(o: Any, members: dict[str, float] | None = None) -> dict[str, Any]:
    """An alpaca-py Order as raytrade's order dict."""
    def val(x: Any) -> Any:
        return getattr(x, "value", x)

    fp = float(o.filled_avg_price) if o.filled_avg_price is not None else None
    legs = [_order_dict(leg) for leg in (o.legs or [])]
    return {
        "client_order_id": o.client_order_id, "broker_order_id": str(o.id), "symbol": o.symbol,
        "side": str(val(o.side)).upper(), "qty": float(o.qty) if o.qty is not None else None,
        "filled_qty": float(o.filled_qty or 0), "type": str(val(o.order_type or o.type)),
        "order_class": str(val(o.order_class)) if o.order_class else None, "status": str(val(o.status)),
        "fill_price": fp, "limit_price": float(o.limit_price) if o.limit_price is not None else None,
        "stop_price": float(o.stop_price) if o.stop_price is not None else None,
        "created_at": o.created_at.timestamp() if o.created_at else None,
        "legs": legs, "members": members or {},
    }


class AlpacaAccount(_BrokerBase):
    """The Alpaca broker's logic, without Ray (``AlpacaBroker`` is this as an actor)."""

    kind = "alpaca"

    def __init__(self, account: str, settings: Settings, signing_key: bytes, client: Any = None):
        super().__init__(account, settings, signing_key)
        acc = settings.accounts[account]
        key = acc.api_key or settings.alpaca.api_key
        secret = acc.secret_key or settings.alpaca.secret_key
        if client is None and (key is None or secret is None):
            raise ValueError(f"account {account!r}: set alpaca.api_key and alpaca.secret_key "
                             f"(or accounts.{account}.api_key / secret_key)")
        self.paper = not settings.risk_limits_for(account).production
        if client is None:
            from alpaca.trading.client import TradingClient

            client = TradingClient(key.get_secret_value(), secret.get_secret_value(), paper=self.paper,
                                   url_override=settings.alpaca.trading_url)
            # alpaca-py sets no timeout; without one a lost answer hangs the actor.
            client._session.request = functools.partial(client._session.request,
                                                        timeout=settings.broker.http_timeout_s)
            # alpaca-py retries 429/504 itself, 3 s apart; ours (with the breaker) is the only retry.
            client._retry_codes = []
        self.client = client
        self.ledger = Ledger(ledger_dir(settings, account) / "ledger.sqlite", 0.0)
        self.rest = Resilient.from_settings(f"alpaca-trading:{account}", settings.resilience,
                                            non_retryable=(AlpacaAuthError, OrderRejected))
        self.auth_error: str | None = None
        self.submit_attempts = 0

    # -- one call to Alpaca, errors sorted into the ones retrying can fix and the rest ----------
    def _api(self, fn: Any, *args: Any, **kw: Any) -> Any:
        from alpaca.common.exceptions import APIError

        if self.auth_error:
            raise AlpacaAuthError(self.auth_error)
        try:
            return fn(*args, **kw)
        except APIError as e:
            status = e.status_code
            try:
                msg = e.message
            except Exception:  # noqa: BLE001 - a body that is not JSON
                msg = str(e)[:200]
            msg = scrub(str(msg))
            if status == 401 or (status == 403 and "authoriz" in msg.lower()):
                self.auth_error = (f"Alpaca refused the trading keys of account {self.account_name!r} "
                                   f"(HTTP {status}: {msg}); check alpaca.api_key / alpaca.secret_key")
                raise AlpacaAuthError(self.auth_error) from None
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise OrderRejected(f"Alpaca refused the request (HTTP {status}): {msg}") from None
            raise RuntimeError(f"Alpaca error (HTTP {status}): {msg}") from None

    def _lookup(self, cid: str) -> Any | None:
        try:
            return self._api(self.client.get_order_by_client_id, cid)
        except OrderRejected as e:
            if "404" in str(e):
                return None
            raise

    def _request(self, order: dict[str, Any]) -> Any:
        from alpaca.trading.enums import OrderClass, OrderSide, TimeInForce
        from alpaca.trading.requests import MarketOrderRequest, StopLossRequest, TakeProfitRequest

        kw: dict[str, Any] = {}
        if order.get("stop_loss") is not None and order.get("take_profit") is not None:
            kw = {"order_class": OrderClass.BRACKET,
                  "take_profit": TakeProfitRequest(limit_price=round(order["take_profit"], 2)),
                  "stop_loss": StopLossRequest(stop_price=round(order["stop_loss"], 2))}
        return MarketOrderRequest(symbol=order["symbol"], qty=order["qty"],
                                  side=OrderSide.BUY if order["side"] == "BUY" else OrderSide.SELL,
                                  time_in_force=TimeInForce.DAY, client_order_id=order["client_order_id"], **kw)

    def place(self, order: dict[str, Any], token: str) -> dict[str, Any]:
        """Submit a (bracket) market order signed by the risk manager; idempotent by client order id."""
        self._verify(order, token, check_expiry=False)
        cid = order["client_order_id"]
        members = order.get("members") or {}
        if self.ledger.order(cid) is None:
            self._verify(order, token, check_expiry=True)
        req = self._request(order)
        tried = [0]

        def attempt() -> Any:
            # Any earlier attempt may have reached Alpaca with its answer lost: look first.
            if tried[0] > 0 or self.ledger.order(cid) is not None:
                found = self._lookup(cid)
                if found is not None:
                    return found
            tried[0] += 1
            self.submit_attempts += 1
            try:
                return self._api(self.client.submit_order, req)
            except OrderRejected as e:
                if "client_order_id must be unique" in str(e):
                    found = self._lookup(cid)
                    if found is not None:
                        return found
                raise

        o = self.rest.call(attempt)
        self.ledger.add_order({"client_order_id": cid, "account": self.account_name, "symbol": order["symbol"],
                               "side": order["side"], "qty": float(order["qty"]), "type": "market",
                               "stop_loss": order.get("stop_loss"), "take_profit": order.get("take_profit"),
                               "status": "submitted", "broker_order_id": str(o.id), "members": members,
                               "verdict": order.get("verdict")})
        self._record(o)
        return _order_dict(o, members)

    def _record(self, o: Any, parent: str | None = None) -> None:
        """Copy an Alpaca order's fill (and its legs') into the ledger, once."""
        cid = o.client_order_id
        if self.ledger.order(cid) is None:
            self.ledger.add_order({"client_order_id": cid, "account": self.account_name, "symbol": o.symbol,
                                   "side": str(getattr(o.side, "value", o.side)).upper(), "qty": float(o.qty or 0),
                                   "type": str(getattr(o.order_type, "value", o.order_type) or "market"),
                                   "parent": parent, "status": "submitted", "broker_order_id": str(o.id)})
        status = str(getattr(o.status, "value", o.status))
        if status == "filled" and o.filled_avg_price is not None:
            self.ledger.apply_fill(cid, float(o.filled_avg_price), 0.0, qty=float(o.filled_qty),
                                   cancel_siblings=False)
        elif status in _FINAL:
            self.ledger.update_order(cid, status=status)
        for leg in o.legs or []:
            self._record(leg, parent=cid)

    def order(self, client_order_id: str) -> dict[str, Any] | None:
        o = self.rest.call(self._lookup, client_order_id)
        if o is None:
            return None
        self._record(o)
        local = self.ledger.order(client_order_id) or {}
        return _order_dict(o, local.get("members"))

    def orders(self, limit: int = 50) -> list[dict[str, Any]]:
        """The ledger's orders (entries; legs inside them), refreshed from Alpaca while they or a leg are open."""
        rows = self.ledger.orders(max(limit * 3, limit))
        stale = {o["parent"] or o["client_order_id"] for o in rows if o["status"] not in _FINAL}
        out = []
        for o in rows:
            if o["parent"] is not None:
                continue
            fresh = self.order(o["client_order_id"]) if o["client_order_id"] in stale else None
            out.append(fresh or o)
            if len(out) >= limit:
                break
        return out

    def book(self) -> dict[str, Any]:
        """Filled positions (Alpaca's), working entries and exits (refreshed from Alpaca), marks.

        A working order counts with what is left of it to fill. Marks are the positions'
        current prices: a symbol with no position has no mark here.
        """
        ps = self.positions()
        working = []
        for o in self.ledger.orders(1000):
            if o["parent"] is not None or o["status"] in _FINAL:
                continue
            fresh = self.order(o["client_order_id"]) or o
            if fresh["status"] in _FINAL:
                continue
            left = float(fresh.get("qty") or 0) - float(fresh.get("filled_qty") or 0)
            if left > 0:
                working.append({"client_order_id": o["client_order_id"], "symbol": o["symbol"], "side": o["side"],
                                "qty": left, "parent": None, "status": fresh["status"], "seq": o.get("seq", 0)})
        return {"positions": {p["symbol"]: p["qty"] for p in ps}, "working": working,
                "marks": {p["symbol"]: p["price"] for p in ps if p["price"] is not None}}

    def positions(self) -> list[dict[str, Any]]:
        ps = self.rest.call(self._api, self.client.get_all_positions)
        return [{"symbol": p.symbol, "qty": float(p.qty), "avg_price": float(p.avg_entry_price),
                 "price": float(p.current_price) if p.current_price is not None else None,
                 "market_value": float(p.market_value or 0), "unrealized_pnl": float(p.unrealized_pl or 0)}
                for p in ps]

    def account(self) -> dict[str, Any]:
        a = self.rest.call(self._api, self.client.get_account)
        equity, last = float(a.equity), float(a.last_equity or a.equity)
        return {"account": self.account_name, "kind": self.kind, "paper": self.paper, "cash": float(a.cash),
                "equity": equity, "positions_value": float(a.long_market_value or 0) + float(a.short_market_value or 0),
                "pnl": cents(equity - last), "buying_power": float(a.buying_power)}

    def analytics(self, days: float = 30.0) -> dict[str, Any]:
        return {"account": self.account_name, **self.ledger.analytics(days)}

    def health(self) -> dict[str, Any]:
        return {"account": self.account_name, "kind": self.kind, "paper": self.paper,
                "ok": self.auth_error is None and self.rest.breaker.snapshot()["state"] == "closed",
                "error": self.auth_error, "breaker": self.rest.breaker.snapshot()}


@ray.remote
class AlpacaBroker(AlpacaAccount):
    """``AlpacaAccount`` as a named Ray actor (``broker:<account>``)."""


def broker_class(settings: Settings, account: str) -> Any:
    return AlpacaBroker if settings.accounts[account].kind == "alpaca" else PaperBroker

