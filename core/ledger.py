"""The trading ledger: orders, fills, positions and cash in SQLite (WAL mode).

One ``Ledger`` file per account (``<broker.ledger_dir>/<account>/ledger.sqlite``)
is the broker's memory. Every fill is one transaction that writes the fill,
the position, the cash and the order's status together, so a broker killed at
any instant restarts from the file with nothing lost and nothing counted
twice: orders are keyed by client order id, fills by the order they fill.

``RiskJournal`` (``risk.sqlite`` beside it) is the risk manager's memory: the
kill switch, halts, the day's starting equity, the equity peak, and every
decision id with its verdict, so a repeated decision gets its first answer.

Money is kept to the cent (rounded half-even at each step, as a float).
P&L of a closing fill is net of its own commission and of the share of the
entry commissions it closes. ``analytics(days)`` reads closing fills only.

Ray-free; the actors in ``actors/broker.py`` and ``actors/risk.py`` own the files.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orders(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client_order_id TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL, symbol TEXT NOT NULL, side TEXT NOT NULL, qty REAL NOT NULL,
    type TEXT NOT NULL DEFAULT 'market', limit_price REAL, stop_price REAL,
    stop_loss REAL, take_profit REAL, parent TEXT,
    status TEXT NOT NULL, reason TEXT,
    created_at REAL NOT NULL, after_ts INTEGER NOT NULL DEFAULT 0,
    filled_at REAL, fill_ts INTEGER, fill_price REAL, commission REAL,
    broker_order_id TEXT, members TEXT NOT NULL DEFAULT '{}', verdict TEXT,
    reduce_only INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS orders_open ON orders(status, symbol);
CREATE TABLE IF NOT EXISTS fills(
    client_order_id TEXT PRIMARY KEY, symbol TEXT NOT NULL, side TEXT NOT NULL, qty REAL NOT NULL,
    price REAL NOT NULL, commission REAL NOT NULL, ts INTEGER, at REAL NOT NULL,
    closed_qty REAL NOT NULL, realized_pnl REAL NOT NULL, members TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS positions(
    symbol TEXT PRIMARY KEY, qty REAL NOT NULL, avg_price REAL NOT NULL,
    open_fees REAL NOT NULL, members TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS marks(symbol TEXT PRIMARY KEY, price REAL NOT NULL, ts INTEGER NOT NULL);
"""

OPEN = ("pending", "held")  # pending: waits for the next bar; held: a bracket leg not yet live


def cents(x: float) -> float:
    return round(x + 0.0, 2)


def _connect(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One connection per actor, used under a lock; autocommit with explicit BEGIN.
    conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise RuntimeError(f"ledger {path} could not be put in WAL mode (got {mode})")
    conn.execute("PRAGMA synchronous=FULL")  # a fill acknowledged is a fill on disk
    return conn


class Ledger:
    """One account's orders, fills, positions and cash."""

    def __init__(self, path: str | Path, starting_cash: float):
        self.path = Path(path)
        self._db = _connect(self.path)
        self._lock = threading.RLock()
        with self._lock:
            self._db.executescript(_SCHEMA)
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(orders)")}
            if "reduce_only" not in cols:  # a ledger written before exits were booked reduce-only
                self._db.execute("ALTER TABLE orders ADD COLUMN reduce_only INTEGER NOT NULL DEFAULT 0")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES('starting_cash', ?)", (repr(float(starting_cash)),))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES('cash', ?)", (repr(float(starting_cash)),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def journal_mode(self) -> str:
        return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    # -- meta ---------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def get_meta(self, key: str, default: Any = None) -> Any:
        v = self._meta(key)
        return default if v is None else json.loads(v)

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, json.dumps(value)))

    @property
    def cash(self) -> float:
        return float(self._meta("cash"))

    @property
    def starting_cash(self) -> float:
        return float(self._meta("starting_cash"))

    # -- orders -------------------------------------------------------------------------
    @staticmethod
    def _order(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        d = dict(row)
        d["reduce_only"] = bool(d.get("reduce_only"))
        d["members"] = json.loads(d["members"] or "{}")
        d["verdict"] = json.loads(d["verdict"]) if d.get("verdict") else None
        return d

    def add_order(self, order: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Record ``order`` unless its client order id is known. Returns (the stored order, created)."""
        cols = ("client_order_id", "account", "symbol", "side", "qty", "type", "limit_price", "stop_price",
                "stop_loss", "take_profit", "parent", "status", "reason", "created_at", "after_ts",
                "broker_order_id", "members", "verdict", "reduce_only")
        rec = dict(order)
        rec["reduce_only"] = int(bool(rec.get("reduce_only")))
        rec.setdefault("created_at", time.time())
        rec["members"] = json.dumps(rec.get("members") or {})
        rec["verdict"] = json.dumps(rec["verdict"]) if rec.get("verdict") is not None else None
        with self._lock:
            cur = self._db.execute(
                f"INSERT OR IGNORE INTO orders({', '.join(cols)}) VALUES({', '.join('?' * len(cols))})",
                tuple(rec.get(c, "market" if c == "type" else 0 if c == "after_ts" else None) for c in cols),
            )
            created = cur.rowcount == 1
            return self.order(order["client_order_id"]), created

    def order(self, client_order_id: str) -> dict[str, Any] | None:
        return self._order(self._db.execute("SELECT * FROM orders WHERE client_order_id=?",
                                            (client_order_id,)).fetchone())

    def orders(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        limit = max(1, min(int(limit), 10_000))
        if status:
            rows = self._db.execute("SELECT * FROM orders WHERE status=? ORDER BY seq DESC LIMIT ?", (status, limit))
        else:
            rows = self._db.execute("SELECT * FROM orders ORDER BY seq DESC LIMIT ?", (limit,))
        return [self._order(r) for r in rows]

    def open_orders(self, symbol: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM orders WHERE status IN ('pending', 'held')"
        rows = self._db.execute(q + " AND symbol=? ORDER BY seq", (symbol,)) if symbol else \
            self._db.execute(q + " ORDER BY seq")
        return [self._order(r) for r in rows]

    def update_order(self, client_order_id: str, **fields: Any) -> None:
        if not fields:
            return
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE orders SET {sets} WHERE client_order_id=?", (*fields.values(), client_order_id))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic write; nested uses join the outer transaction."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- fills --------------------------------------------------------------------------
    def apply_fill(self, client_order_id: str, price: float, commission: float, ts: int | None = None,
                   at: float | None = None, qty: float | None = None,
                   cancel_siblings: bool = True) -> dict[str, Any] | None:
        """Fill an order: fill, position, cash and status in one transaction. Idempotent:
        an order already filled returns its fill and changes nothing."""
        at = time.time() if at is None else at
        with self.transaction():
            old = self._db.execute("SELECT * FROM fills WHERE client_order_id=?", (client_order_id,)).fetchone()
            if old is not None:
                return dict(old)
            o = self.order(client_order_id)
            if o is None:
                raise KeyError(f"no order {client_order_id!r} in the ledger")
            fill = self._fill_locked(o, price, commission, ts, at, qty if qty is not None else o["qty"])
            if cancel_siblings and o["parent"]:  # one exit leg of a bracket filled: the other goes (OCO)
                self._db.execute(
                    "UPDATE orders SET status='canceled', reason='other bracket leg filled' "
                    "WHERE parent=? AND client_order_id<>? AND status IN ('pending', 'held')",
                    (o["parent"], client_order_id))
            if o["parent"] is None:  # the entry filled: its bracket legs go live from the next bar
                self._db.execute("UPDATE orders SET status='pending', after_ts=? WHERE parent=? AND status='held'",
                                 (ts or 0, client_order_id))
            self._fit_legs(o["symbol"])
            return fill

    def position_qty(self, symbol: str) -> float:
        """Signed filled shares of ``symbol`` (0 when flat)."""
        row = self._db.execute("SELECT qty FROM positions WHERE symbol=?", (symbol,)).fetchone()
        return float(row[0]) if row else 0.0

    def reducible(self, o: dict[str, Any]) -> float:
        """How much of reduce-only order ``o`` may fill now: at most the filled position it reduces."""
        q = self.position_qty(o["symbol"])
        if q == 0 or (q > 0) == (o["side"] == "BUY"):
            return 0.0
        return min(float(o["qty"]), abs(q))

    def _fit_legs(self, symbol: str) -> None:
        """Live bracket legs protect the filled position, never more of it, never the other side.

        Pairs (one entry's stop and take-profit, one-cancels-other) are kept oldest first
        while their quantity fits in the position; the pair that does not fit is cut to what
        is left, and the rest are canceled, so no leg can ever open a position. Run after
        every fill, inside its transaction.
        """
        q = self.position_qty(symbol)
        rows = self._db.execute(
            "SELECT client_order_id, parent, side, qty FROM orders WHERE symbol=? AND parent IS NOT NULL "
            "AND status='pending' ORDER BY seq", (symbol,)).fetchall()
        pairs: dict[str, list[sqlite3.Row]] = {}
        for r in rows:
            pairs.setdefault(r["parent"], []).append(r)
        left = abs(q)
        protective = "SELL" if q > 0 else "BUY"
        for legs in pairs.values():
            want = max(float(r["qty"]) for r in legs)
            keep = min(want, left) if q != 0 and legs[0]["side"] == protective else 0.0
            left -= keep
            for r in legs:
                if keep <= 0:
                    why = ("the position it protected closed" if q == 0 else
                           "the position it protected reversed" if legs[0]["side"] != protective else
                           "the position it protected shrank")
                    self._db.execute("UPDATE orders SET status='canceled', reason=? WHERE client_order_id=?",
                                     (why, r["client_order_id"]))
                elif keep < float(r["qty"]):
                    self._db.execute("UPDATE orders SET qty=?, reason=? WHERE client_order_id=?",
                                     (keep, "cut to the position it protects", r["client_order_id"]))

    def _fill_locked(self, o: dict[str, Any], price: float, commission: float, ts: int | None, at: float,
                     qty: float) -> dict[str, Any]:
        sym = o["symbol"]
        s = qty if o["side"] == "BUY" else -qty
        price, commission = float(price), cents(commission)
        row = self._db.execute("SELECT * FROM positions WHERE symbol=?", (sym,)).fetchone()
        q0, a0, f0 = (row["qty"], row["avg_price"], row["open_fees"]) if row else (0.0, 0.0, 0.0)
        m0 = json.loads(row["members"]) if row else {}
        closed, realized, attributed = 0.0, 0.0, {}
        if q0 == 0 or (q0 > 0) == (s > 0):  # opening or adding
            q1 = q0 + s
            a1 = (abs(q0) * a0 + abs(s) * price) / abs(q1)
            f1 = f0 + commission
            m1 = _blend(m0, abs(q0), o["members"], abs(s))
        else:  # reducing, closing, or flipping through zero
            closed = min(abs(s), abs(q0))
            gross = closed * (price - a0) * math.copysign(1.0, q0)
            fee_part = f0 * closed / abs(q0)
            c_close = commission * closed / abs(s)
            realized = cents(gross - fee_part - c_close)
            attributed = m0
            q1 = q0 + s
            if abs(s) <= abs(q0):
                a1, f1, m1 = (a0 if q1 != 0 else 0.0), f0 - fee_part, (m0 if q1 != 0 else {})
            else:
                a1, f1, m1 = price, commission - c_close, dict(o["members"])
        q1 = round(q1, 9)
        cash = self.cash - s * price - commission
        self._db.execute("UPDATE meta SET value=? WHERE key='cash'", (repr(cents(cash)),))
        if q1 == 0:
            self._db.execute("DELETE FROM positions WHERE symbol=?", (sym,))
        else:
            self._db.execute("INSERT OR REPLACE INTO positions VALUES(?, ?, ?, ?, ?)",
                             (sym, q1, a1, f1, json.dumps(m1)))
        fill = {"client_order_id": o["client_order_id"], "symbol": sym, "side": o["side"], "qty": qty,
                "price": price, "commission": commission, "ts": ts, "at": at, "closed_qty": closed,
                "realized_pnl": realized, "members": json.dumps(attributed)}
        self._db.execute("INSERT INTO fills VALUES(:client_order_id, :symbol, :side, :qty, :price, :commission, "
                         ":ts, :at, :closed_qty, :realized_pnl, :members)", fill)
        self._db.execute("UPDATE orders SET status='filled', filled_at=?, fill_ts=?, fill_price=?, commission=?, "
                         "qty=? WHERE client_order_id=?", (at, ts, price, commission, qty, o["client_order_id"]))
        if ts is not None:
            self._mark_locked(sym, price, ts)
        return fill

    def fills(self, limit: int = 100) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute("SELECT * FROM fills ORDER BY at DESC, rowid DESC LIMIT ?",
                                                  (max(1, int(limit)),))]

    # -- marks, positions, account ------------------------------------------------------
    def _mark_locked(self, symbol: str, price: float, ts: int) -> None:
        self._db.execute("INSERT INTO marks VALUES(?, ?, ?) ON CONFLICT(symbol) DO UPDATE SET price=excluded.price, "
                         "ts=excluded.ts WHERE excluded.ts >= marks.ts", (symbol, float(price), int(ts)))

    def mark(self, symbol: str, price: float, ts: int) -> None:
        with self._lock:
            self._mark_locked(symbol, price, ts)

    def last_ts(self, symbol: str) -> int:
        row = self._db.execute("SELECT ts FROM marks WHERE symbol=?", (symbol,)).fetchone()
        return int(row[0]) if row else 0

    def market_ts(self) -> int | None:
        """The exchange time (ns) of the newest bar this ledger marked, any symbol; None before the first."""
        row = self._db.execute("SELECT MAX(ts) FROM marks").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def marks(self) -> dict[str, float]:
        return {r["symbol"]: r["price"] for r in self._db.execute("SELECT * FROM marks")}

    def positions(self) -> list[dict[str, Any]]:
        marks = self.marks()
        out = []
        for r in self._db.execute("SELECT * FROM positions ORDER BY symbol"):
            px = marks.get(r["symbol"], r["avg_price"])
            out.append({"symbol": r["symbol"], "qty": r["qty"], "avg_price": round(r["avg_price"], 6),
                        "price": px, "market_value": cents(r["qty"] * px),
                        "unrealized_pnl": cents((px - r["avg_price"]) * r["qty"]),
                        "members": json.loads(r["members"])})
        return out

    def account(self) -> dict[str, Any]:
        pos = self.positions()
        cash = self.cash
        mv = sum(p["market_value"] for p in pos)
        realized = self._db.execute("SELECT COALESCE(SUM(realized_pnl), 0) FROM fills").fetchone()[0]
        fees = self._db.execute("SELECT COALESCE(SUM(commission), 0) FROM fills").fetchone()[0]
        equity = cents(cash + mv)
        return {"cash": cents(cash), "equity": equity, "positions_value": cents(mv),
                "starting_cash": self.starting_cash, "pnl": cents(equity - self.starting_cash),
                "realized_pnl": cents(realized), "unrealized_pnl": cents(sum(p["unrealized_pnl"] for p in pos)),
                "commissions": cents(fees), "open_orders": len(self.open_orders())}

    # -- analytics ----------------------------------------------------------------------
    def analytics(self, days: float = 30.0, now: float | None = None) -> dict[str, Any]:
        """Win rate, average win and loss, P&L by symbol and by member, over closing fills of the last ``days``.

        A closing fill's P&L is shared among the members of the position it
        closes, in proportion to the size of each member's contribution.
        """
        now = time.time() if now is None else now
        rows = self._db.execute("SELECT * FROM fills WHERE closed_qty > 0 AND at >= ? ORDER BY at",
                                (now - days * 86400.0,)).fetchall()
        pnls = [r["realized_pnl"] for r in rows]
        wins = [p for p in pnls if p > 0]
        losses = [p for p in pnls if p < 0]
        by_symbol: dict[str, float] = {}
        by_member: dict[str, float] = {}
        for r in rows:
            by_symbol[r["symbol"]] = cents(by_symbol.get(r["symbol"], 0.0) + r["realized_pnl"])
            members = json.loads(r["members"] or "{}")
            total = sum(abs(v) for v in members.values())
            for name, v in members.items():
                if total > 0:
                    by_member[name] = by_member.get(name, 0.0) + r["realized_pnl"] * abs(v) / total
        return {
            "days": days, "trades": len(pnls), "wins": len(wins), "losses": len(losses),
            "win_rate": round(len(wins) / len(pnls), 6) if pnls else None,
            "avg_win": cents(sum(wins) / len(wins)) if wins else None,
            "avg_loss": cents(sum(losses) / len(losses)) if losses else None,
            "total_pnl": cents(sum(pnls)),
            "pnl_by_symbol": by_symbol,
            "pnl_by_member": {k: cents(v) for k, v in sorted(by_member.items())},
        }


def _blend(a: dict[str, float], wa: float, b: dict[str, float], wb: float) -> dict[str, float]:
    """Members of a position after adding ``wb`` shares decided by ``b`` to ``wa`` shares decided by ``a``."""
    if not b:
        return dict(a)
    if not a or wa == 0:
        return dict(b)
    keys = set(a) | set(b)
    return {k: (a.get(k, 0.0) * wa + b.get(k, 0.0) * wb) / (wa + wb) for k in keys}


class RiskJournal:
    """The risk manager's state and decisions, surviving its restarts."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS decisions(
        decision_id TEXT PRIMARY KEY, at REAL NOT NULL, request TEXT NOT NULL, verdict TEXT NOT NULL,
        status TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL,
                                      detail TEXT NOT NULL);
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = _connect(self.path)
        self._lock = threading.RLock()
        self._db.executescript(self._SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO state VALUES(?, ?)", (key, json.dumps(value)))

    def event(self, kind: str, **detail: Any) -> None:
        with self._lock:
            self._db.execute("INSERT INTO events(at, kind, detail) VALUES(?, ?, ?)",
                             (time.time(), kind, json.dumps(detail)))

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (max(1, int(limit)),))
        return [{"at": r["at"], "kind": r["kind"], **json.loads(r["detail"])} for r in rows]

    def decision(self, decision_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM decisions WHERE decision_id=?", (decision_id,)).fetchone()
        if row is None:
            return None
        return {"decision_id": row["decision_id"], "at": row["at"], "request": json.loads(row["request"]),
                "verdict": json.loads(row["verdict"]), "status": row["status"]}

    def record_decision(self, decision_id: str, request: dict[str, Any], verdict: dict[str, Any], status: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO decisions VALUES(?, ?, ?, ?, ?)",
                             (decision_id, time.time(), json.dumps(request), json.dumps(verdict), status))

    def count_decisions(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.execute("SELECT status, COUNT(*) FROM decisions GROUP BY status")}
