"""The risk limits under concurrent traffic, over HTTP, on the running system.

Eight clients send executed decisions and orders of random sizes and sides, over two symbols
and two accounts, bounded in count and time; one account is halted by an admin half-way.
Afterwards the accounts' own files (the risk journal's verdicts, the ledger's orders and fills)
must show:

* every approved entry left the book (filled plus working) within the position cap, at the
  equity and price it was judged on;
* the fills, replayed in order, never carried a position past the largest book the risk
  manager approved for it;
* no exit and no bracket leg opened or flipped a position (each of their fills only closed shares);
* after the halt, nothing but exits was approved on the halted account.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

ACCOUNTS = ("alt", "alt2")
SYMS = ("SPY", "QQQ")
CLIENTS = 8
PER_CLIENT = 30
DEADLINE_S = 120.0


def _rows(path: Path, sql: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_eight_clients_cannot_push_an_account_past_its_limits(trading_app):
    url, keys, settings = trading_app["url"], trading_app["keys"], trading_app["settings"]
    trade = {"X-API-Key": keys["trade"]}
    with httpx.Client(base_url=url, timeout=30) as c:  # the live window is up before the load starts
        deadline = time.time() + 120
        while time.time() < deadline:
            if c.get("/v1/signal/SPY", headers=trade).status_code == 200:
                break
            time.sleep(0.5)

    halted = {"at": None}
    counts = {"sent": 0, "approved": 0, "refused": 0, "other": 0}
    lock = threading.Lock()
    stop_at = time.time() + DEADLINE_S

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(PER_CLIENT):
                if time.time() > stop_at:
                    return
                acct, sym = rng.choice(ACCOUNTS), rng.choice(SYMS)
                if rng.random() < 0.5:
                    r = c.post("/v1/decisions", headers=trade,
                               json={"symbol": sym, "account": acct, "execute": True,
                                     "decision_id": f"st-{uuid.uuid4().hex[:16]}"})
                    ok = r.status_code == 200 and (r.json().get("order") is not None)
                else:
                    r = c.post("/v1/orders", headers=trade,
                               json={"symbol": sym, "account": acct, "side": rng.choice(["BUY", "SELL"]),
                                     "quantity": rng.randint(1, 40), "client_order_id": f"st-{uuid.uuid4().hex[:16]}"})
                    ok = r.status_code == 200
                with lock:
                    counts["sent"] += 1
                    counts["approved" if ok else "refused" if r.status_code in (200, 422) else "other"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/risk/halt", headers={"X-API-Key": keys["admin"]},
                   json={"reason": "stress test", "account": "alt2"})
        assert r.status_code == 200, r.text
        halted["at"] = time.time()
    for t in threads:
        t.join(timeout=DEADLINE_S + 60)
    assert not any(t.is_alive() for t in threads)
    assert counts["other"] == 0, counts  # every answer was an order or a refusal with a reason
    assert counts["approved"] > 0 and counts["refused"] > 0, counts

    time.sleep(2.0)  # a few more bars: working orders fill, legs may trigger
    ledger_root = Path(settings.broker.ledger_dir)
    try:
        for acct in ACCOUNTS:
            limits = settings.risk_limits_for(acct)
            verdicts = [(r["at"], json.loads(r["request"]), json.loads(r["verdict"])) for r in
                        _rows(ledger_root / acct / "risk.sqlite",
                              "SELECT at, request, verdict FROM decisions ORDER BY at")]
            approved = [(at, req, v) for at, req, v in verdicts if v.get("approved")]
            assert approved, f"{acct}: nothing approved"
            largest: dict[str, float] = {}
            for at, req, v in approved:
                sym, after = v["symbol"], float(v["position_after"])
                largest[sym] = max(largest.get(sym, 0.0), abs(after))
                if v["entry"]:
                    price = float(req["price"])
                    cap = float(v["equity"]) * limits.max_position_for(sym)
                    assert abs(after) * price <= cap * (1 + 1e-9) + 0.01, (acct, v)
                    if acct == "alt2":
                        assert at < halted["at"] + 1.0, f"an entry approved after the halt: {v['reasons']}"
            # Fills in the order they happened never pass the largest approved book.
            pos: dict[str, float] = {}
            fills = _rows(ledger_root / acct / "ledger.sqlite",
                          "SELECT f.symbol, f.side, f.qty, f.closed_qty, o.reduce_only, o.parent "
                          "FROM fills f JOIN orders o ON o.client_order_id = f.client_order_id ORDER BY f.rowid")
            for f in fills:
                pos[f["symbol"]] = pos.get(f["symbol"], 0.0) + (f["qty"] if f["side"] == "BUY" else -f["qty"])
                assert abs(pos[f["symbol"]]) <= largest.get(f["symbol"], 0.0) + 1e-9, (acct, dict(f), largest)
                if f["reduce_only"] or f["parent"]:
                    assert abs(f["closed_qty"] - f["qty"]) < 1e-9, f"{acct}: an exit or leg opened shares: {dict(f)}"
    finally:
        with httpx.Client(base_url=url, timeout=30) as c:
            c.post("/v1/risk/resume", headers={"X-API-Key": keys["admin"]}, json={"account": "alt2"})
