"""The risk manager: one actor per account (``risk:<account>``), the only way to its broker.

Every order, whichever route it came by, is judged here by ``core.risk.evaluate``
against the account's limits (``settings.risk_limits_for(account)``), sized, and
only then placed, with a verdict token that the broker checks (see
``actors/broker.py``). The token's key is held by this actor and the broker
only; ``open_account`` makes both.

State that must survive a restart lives in ``risk.sqlite`` beside the ledger
(``core.ledger.RiskJournal``):

* the **kill switch**: drawdown from the equity peak reaching
  ``max_drawdown_pct`` latches it; it stays on, across restarts, until an
  admin calls ``resume(by)``, which also re-bases the peak at today's equity;
* the **daily loss halt**: the day's P&L (the trading day of the newest bar
  the broker marked, by the exchange calendar ``feeds.calendar``:
  ``core.market_clock``; from the first equity seen that day) reaching
  ``-max_daily_loss_pct`` stops new entries until the next trading day, so a
  replay follows the replayed market's days, not the wall clock; ``resume``
  does not lift it;
* an admin's ``halt(reason, by)``;
* every decision id with its verdict: a repeated ``submit`` returns the first
  verdict and the first order, never a second order.

Orders are judged on the account's book: filled positions plus working
orders (``core.risk`` says how). This actor judges one order at a time (a
Ray actor with one thread) and books it with the broker before it judges the
next, so check and reservation are one step per account, whatever route or
how many callers. Exits (orders that only reduce the book) pass every halt,
and are booked reduce-only: the broker cuts them to the position when they
fill.

Contract (the Serve ingress uses these names):

* ``evaluate(order_request) -> verdict`` (nothing is placed)
* ``submit(order_request) -> {"verdict", "order", "duplicate", "error"}``
* ``halt(reason, by) -> state``, ``resume(by) -> state``, ``state() -> dict``
* ``refresh() -> state`` (re-reads equity; trips the kill switch / daily halt)
* read-throughs to the broker: ``positions()``, ``orders(limit)``,
  ``account()``, ``analytics(days)``, ``broker_health()``

An ``order_request`` is ``{account, symbol, side, target_position, confidence,
price, atr?, stop_loss?, take_profit?, quantity?, members?, decision_id}``; a
bad one gets a refused verdict with ``"error": "bad_request"`` and a reason
that says what to fix.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import ray

from actors.broker import broker_class, ledger_dir
from cluster import names
from cluster.logs import add_secrets, get_logger
from cluster.runtime import actor_options
from cluster.settings import Settings
from core.ledger import RiskJournal
from core.market_clock import ALWAYS_OPEN, trading_day
from core.market_clock import calendar as calendar_of
from core.risk import (Book, OrderRequest, OrderRequestError, bad_request_verdict, book_from_snapshot,
                       daily_loss_breached, day_pnl, drawdown, drawdown_breached, evaluate, order_for,
                       pending_by_symbol,
                       sign_order)

log = get_logger("risk")


@ray.remote
class RiskManager:
    def __init__(self, account: str, settings: Settings, signing_key: bytes, broker: Any):
        self.account = account
        self.settings = settings
        self.limits = settings.risk_limits_for(account)
        self.calendar = settings.feeds.calendar
        calendar_of(self.calendar) if self.calendar != ALWAYS_OPEN else None  # an unknown name fails here, once
        self._key = bytes(signing_key)
        self._broker = broker
        self._ttl = settings.broker.token_ttl_s
        add_secrets(settings.secret_values())
        self.journal = RiskJournal(ledger_dir(settings, account) / "risk.sqlite")

    # -- the account as of now ----------------------------------------------------------
    def _observe(self) -> dict[str, Any]:
        """Read equity from the broker, update the day start and the peak, latch the halts."""
        acct = ray.get(self._broker.account.remote())
        equity = float(acct["equity"])
        j = self.journal
        day = j.get("day") or {}
        # The trading day of the newest bar the broker marked (Alpaca: none, so the wall clock's).
        today = trading_day(acct.get("market_ts"), self.calendar)
        if day.get("date") != today:
            day = {"date": today, "start_equity": equity}
            j.set("day", day)
            if j.get("daily_halt"):
                j.set("daily_halt", None)
                j.event("daily_halt_cleared", reason="a new day")
        prior = j.get("peak_equity")
        peak = max(float(prior or equity), equity)
        if prior is None or peak != float(prior):  # a write only when the peak moves
            j.set("peak_equity", peak)
        book = Book(equity=equity, day_start_equity=day["start_equity"], peak_equity=peak)
        if j.get("kill_switch") is None and drawdown_breached(self.limits, book):
            reason = (f"drawdown {drawdown(book):.2%} from peak {peak:.2f} reached "
                      f"{self.limits.max_drawdown_pct:.2%}")
            j.set("kill_switch", {"reason": reason, "at": time.time()})
            j.event("kill_switch", reason=reason)
            log.warning("risk %s: kill switch on: %s", self.account, reason)
        if j.get("daily_halt") is None and daily_loss_breached(self.limits, book):
            reason = (f"day P&L {day_pnl(book):.2f} reached the daily loss limit "
                      f"{self.limits.max_daily_loss_pct:.2%} of {day['start_equity']:.2f}: no new entries today")
            j.set("daily_halt", {"reason": reason, "date": day["date"], "at": time.time()})
            j.event("daily_halt", reason=reason)
            log.warning("risk %s: %s", self.account, reason)
        return {"account": acct, "equity": equity, "day": day, "peak": peak}

    def _snapshot(self, obs: dict[str, Any]) -> dict[str, Any]:
        book = ray.get(self._broker.book.remote())
        j = self.journal
        ks, halt, daily = j.get("kill_switch"), j.get("halt"), j.get("daily_halt")
        return {"account": self.account, "at": time.time(), "equity": obs["equity"],
                "positions": book["positions"], "pending": pending_by_symbol(book["working"], book["positions"]),
                "working_orders": sum(1 for o in book["working"] if not o.get("parent")),
                "marks": book["marks"],
                "day_start_equity": obs["day"]["start_equity"], "peak_equity": obs["peak"],
                "halted": f"{halt['reason']} (by {halt['by']})" if halt else None,
                "kill_switch": ks["reason"] if ks else None, "daily_halt": daily["reason"] if daily else None}

    def _book(self, obs: dict[str, Any], symbol: str) -> Book:
        return book_from_snapshot(self._snapshot(obs), symbol)

    def _parse(self, order_request: Any) -> OrderRequest:
        req = OrderRequest.from_dict(order_request)
        if req.account != self.account:
            raise OrderRequestError(f"account {req.account!r} is not this risk manager's ({self.account!r})")
        return req

    def _judge(self, req: OrderRequest) -> dict[str, Any]:
        obs = self._observe()
        verdict = evaluate(self.limits, req, self._book(obs, req.symbol))
        verdict["equity"] = obs["equity"]
        verdict["at"] = time.time()
        return verdict

    # -- the contract ---------------------------------------------------------------------
    def evaluate(self, order_request: dict[str, Any]) -> dict[str, Any]:
        """The verdict on an order request; nothing is placed or recorded."""
        try:
            req = self._parse(order_request)
        except OrderRequestError as e:
            return bad_request_verdict(str(e), order_request)
        return self._judge(req)

    def submit(self, order_request: dict[str, Any]) -> dict[str, Any]:
        """Judge, then place through the broker. Idempotent by decision id (the client order id)."""
        try:
            req = self._parse(order_request)
        except OrderRequestError as e:
            return {"verdict": bad_request_verdict(str(e), order_request), "order": None, "duplicate": False,
                    "error": str(e)}
        first = self.journal.decision(req.decision_id)
        if first is not None:
            verdict, duplicate = first["verdict"], True
            if not verdict["approved"]:
                return {"verdict": verdict, "order": None, "duplicate": True, "error": None}
            req = OrderRequest.from_dict(first["request"])  # the first request, whatever this one says
        else:
            verdict, duplicate = self._judge(req), False
            self.journal.record_decision(req.decision_id, req.to_dict(), verdict,
                                         "approved" if verdict["approved"] else "refused")
            if not verdict["approved"]:
                log.info("risk %s: refused %s: %s", self.account, req.decision_id, "; ".join(verdict["reasons"]))
                return {"verdict": verdict, "order": None, "duplicate": False, "error": None}
        order = order_for(req, verdict)
        # Signed afresh each time: a retry after a crash or a broker error places the same
        # order (same id, same quantity) or finds the one already placed.
        token = sign_order(self._key, order, self._ttl)
        try:
            placed = ray.get(self._broker.place.remote(order, token))
        except Exception as e:  # noqa: BLE001 - the broker's refusal, unwrapped from Ray's error
            cause = getattr(e, "cause", None) or e
            msg = f"{type(cause).__name__}: {cause}".splitlines()[0]
            self.journal.record_decision(req.decision_id, req.to_dict(), verdict, "broker_error")
            self.journal.event("broker_error", decision_id=req.decision_id, error=msg)
            log.warning("risk %s: broker error on %s: %s", self.account, req.decision_id, msg)
            return {"verdict": verdict, "order": None, "duplicate": duplicate, "error": msg}
        self.journal.record_decision(req.decision_id, req.to_dict(), verdict, "placed")
        return {"verdict": verdict, "order": placed, "duplicate": duplicate, "error": None}

    def snapshot(self) -> dict[str, Any]:
        """What a verdict reads (equity, positions, day start, peak, halts), halts latched as ``evaluate`` would.

        The ingress previews verdicts from it (``core.risk.book_from_snapshot``)
        for decisions that are not executed; an order is always judged here, on
        the account as it is when the order arrives.
        """
        return self._snapshot(self._observe())

    def halt(self, reason: str, by: str) -> dict[str, Any]:
        """Stop new entries until ``resume``; exits still pass."""
        if not isinstance(reason, str) or not reason.strip() or not isinstance(by, str) or not by.strip():
            raise ValueError("halt needs a reason and who halts")
        self.journal.set("halt", {"reason": reason.strip(), "by": by.strip(), "at": time.time()})
        self.journal.event("halt", reason=reason.strip(), by=by.strip())
        log.warning("risk %s: halted by %s: %s", self.account, by, reason)
        return self.state()

    def resume(self, by: str) -> dict[str, Any]:
        """Lift an admin's halt and the kill switch; the equity peak restarts from today's equity.

        The daily loss halt stays until the next trading day.
        """
        if not isinstance(by, str) or not by.strip():
            raise ValueError("resume needs who resumes")
        j = self.journal
        was = {"halt": j.get("halt"), "kill_switch": j.get("kill_switch")}
        equity = float(ray.get(self._broker.account.remote())["equity"])
        j.set("halt", None)
        j.set("kill_switch", None)
        j.set("peak_equity", equity)
        j.event("resume", by=by.strip(), lifted=[k for k, v in was.items() if v], peak_equity=equity)
        log.warning("risk %s: resumed by %s", self.account, by)
        return self.state()

    def refresh(self) -> dict[str, Any]:
        return self.state()

    def state(self) -> dict[str, Any]:
        """Limits, the current use of each, day P&L, drawdown, halts and their reasons."""
        obs = self._observe()
        j = self.journal
        eq, lim = obs["equity"], self.limits
        positions = {p["symbol"]: p for p in ray.get(self._broker.positions.remote())}
        book = ray.get(self._broker.book.remote())
        pending = pending_by_symbol(book["working"], book["positions"])
        use = {}
        for sym in sorted(set(positions) | set(pending)):
            p = positions.get(sym, {})
            filled = float(p.get("qty", 0.0))
            price = p.get("price") or book["marks"].get(sym)
            cap = eq * lim.max_position_for(sym)
            value = abs(filled + pending.get(sym, 0.0)) * float(price or 0.0)
            use[sym] = {"qty": filled, "pending": pending.get(sym, 0.0), "book_qty": filled + pending.get(sym, 0.0),
                        "value": round(value, 2), "limit": round(cap, 2),
                        "pct_of_equity": round(value / eq, 6) if eq else None,
                        "use_of_limit": round(value / cap, 6) if cap else None}
        book = Book(equity=eq, day_start_equity=obs["day"]["start_equity"], peak_equity=obs["peak"])
        ks, halt, daily = j.get("kill_switch"), j.get("halt"), j.get("daily_halt")
        reasons = [f"kill switch: {ks['reason']}; an admin must resume"] if ks else []
        reasons += [f"halted by {halt['by']}: {halt['reason']}"] if halt else []
        reasons += [daily["reason"]] if daily else []
        return {
            "account": self.account, "kind": obs["account"].get("kind"),
            "limits": lim.model_dump(),
            "equity": eq, "cash": obs["account"].get("cash"),
            "day": obs["day"]["date"], "day_start_equity": obs["day"]["start_equity"],
            "daily_pnl": round(day_pnl(book), 2),
            "daily_loss_limit": round(-lim.max_daily_loss_pct * obs["day"]["start_equity"], 2),
            "daily_loss_use": round(max(0.0, -day_pnl(book)) / (lim.max_daily_loss_pct * obs["day"]["start_equity"]), 6),
            "peak_equity": obs["peak"], "drawdown": round(drawdown(book), 6),
            "drawdown_use": round(drawdown(book) / lim.max_drawdown_pct, 6),
            "positions": use,
            "halted": halt is not None, "halt": halt,
            "kill_switch": ks is not None, "kill_switch_detail": ks,
            "daily_halt": daily is not None, "daily_halt_detail": daily,
            "entries_allowed": not (ks or halt or daily),
            "reasons": reasons,
            "decisions": j.count_decisions(),
            "events": j.events(20),
        }

    # -- read-throughs, so the ingress needs one handle per account --------------------------
    def positions(self) -> list[dict[str, Any]]:
        return ray.get(self._broker.positions.remote())

    def orders(self, limit: int = 50) -> list[dict[str, Any]]:
        return ray.get(self._broker.orders.remote(limit))

    def account_summary(self) -> dict[str, Any]:
        return ray.get(self._broker.account.remote())

    def analytics(self, days: float = 30.0) -> dict[str, Any]:
        return ray.get(self._broker.analytics.remote(days))

    def broker_health(self) -> dict[str, Any]:
        return ray.get(self._broker.health.remote())


def _absolute(settings: Settings) -> Settings:
    """Settings whose ledger folder is absolute, so actors on any worker find the same files."""
    path = str(Path(settings.broker.ledger_dir).expanduser().resolve())
    return settings.model_copy(update={"broker": settings.broker.model_copy(update={"ledger_dir": path})})


def open_account(settings: Settings, account: str = "default", *, detached: bool = True) -> tuple[Any, Any]:
    """Start (or find) the risk manager and broker of ``account``. Returns (risk manager, broker) handles.

    The two share a signing key: ``broker.signing_key`` when set, otherwise a
    fresh random one. Ray restarts an actor with its first arguments, so a
    restarted actor keeps its key; when only one of the pair exists (the other
    was removed), both are made anew with the new key, from their files.
    """
    if account not in settings.accounts:
        raise ValueError(f"unknown account {account!r}; accounts are {', '.join(settings.accounts)}")
    settings = _absolute(settings)
    pair = (names.risk(account), names.broker(account))
    found = [names.lookup(n, settings) for n in pair]
    if all(h is not None for h in found):
        return found[0], found[1]
    if settings.broker.signing_key is not None:
        key = settings.broker.signing_key.get_secret_value().encode()
    else:
        key = secrets.token_bytes(32)
        for h in found:  # one of a pair with an unknown key: replace it (its state is in its files)
            if h is not None:
                ray.kill(h, no_restart=True)
    cls = broker_class(settings, account)
    broker = cls.options(**actor_options("broker", settings, pair[1], detached=detached)).remote(
        account, settings, key)
    risk = RiskManager.options(**actor_options("risk", settings, pair[0], detached=detached)).remote(
        account, settings, key, broker)
    return risk, broker


def open_accounts(settings: Settings, *, detached: bool = True) -> dict[str, Any]:
    """``open_account`` for every account in settings; returns the risk manager handles by account."""
    return {name: open_account(settings, name, detached=detached)[0] for name in settings.accounts}
